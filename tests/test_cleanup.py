"""Nothing left behind: a trainer stopped with SIGTERM or killed with SIGKILL takes its loader workers, the
forkserver that starts them and the resource tracker with it."""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from helpers import ROOT, STOPPABLE_STAGE, write_vae_config

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds a run's processes through /proc")


def environment_of(pid: int) -> dict:
    """Process `pid`'s environment as bytes KEY -> VALUE; empty when it ended meanwhile or is not ours to read."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return {}


def processes_marked(marker: str) -> list:
    """The processes whose environment carries `marker` (KEY=VALUE): the trainer and every process it started,
    however far down and whoever their parent is now."""
    key, value = marker.encode().split(b"=", 1)
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and environment_of(int(name)).get(key) == value]


def descendants(pid: int) -> set:
    """The processes below `pid` now (through /proc/PID/task/*/children)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task") if os.path.isdir(f"/proc/{parent}/task") else []:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = {int(c) for c in f.read().split()}
            except OSError:
                continue
            todo += list(children - found)
            found |= children
    return found


def running(pid: int) -> bool:
    """Whether process `pid` exists and has not ended (a zombie waits only to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid}: " + f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return f"{pid}: ended"


def wait_for(condition, seconds: float, step: float = 0.2) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(step)
    return condition()


@pytest.fixture
def trainer_with_a_worker(tmp_path, shapes_dir):
    """A pretrain_vae.py run with one loader worker, started as its own process and past its first checkpoint:
    (process, marker, the processes it had started by then)."""
    marker = f"MSF_TEST_RUN={uuid.uuid4().hex}"
    config = write_vae_config(tmp_path, shapes_dir, steps=2000, val_every=2, num_workers=1, val_samples=4,
                              log_every=100)
    env = dict(os.environ, OMP_NUM_THREADS="1", **dict([marker.split("=", 1)]))
    process = subprocess.Popen([sys.executable, "pretrain_vae.py", config, "--device", "cpu"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: any(n.startswith("ckpt_") for n in os.listdir(tmp_path / "run"))
                        if (tmp_path / "run").is_dir() else False, 120), "no checkpoint within 120 s"
        children = descendants(process.pid)
        assert len(children) >= 3, children  # the resource tracker, the forkserver and the worker at least
        yield process, marker, children
    finally:
        for pid in processes_marked(marker):  # whatever the test left: the processes it started, by id
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(30)


def test_sigterm_stops_a_trainer_like_ctrl_c_and_takes_its_workers_along(trainer_with_a_worker, tmp_path):
    process, marker, children = trainer_with_a_worker
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGTERM; ") and "continue from it with --resume auto" in last, err[-2000:]
    assert f"{tmp_path / 'run'} keeps every checkpoint up to ckpt_" in last
    assert "Traceback" not in err, err[-3000:]
    assert wait_for(lambda: not processes_marked(marker) and not any(running(pid) for pid in children), 10), \
        [command_line(pid) for pid in set(processes_marked(marker)) | children if running(pid)]


def test_sigkill_of_a_trainer_ends_its_workers_forkserver_and_tracker(trainer_with_a_worker):
    process, marker, children = trainer_with_a_worker
    process.kill()
    process.wait(30)
    assert wait_for(lambda: not processes_marked(marker) and not any(running(pid) for pid in children), 10), \
        [command_line(pid) for pid in set(processes_marked(marker)) | children if running(pid)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stages follow their study through prctl (Linux)")
def test_sigkill_of_a_study_ends_its_running_stages(tmp_path):
    stage = tmp_path / "stage.py"  # takes SIGTERM as a trainer does: writes down that it was stopped, then ends
    stage.write_text(STOPPABLE_STAGE)
    marks = [tmp_path / "a", tmp_path / "b"]
    runner = (f"import study\nstudy.Study({str(tmp_path / 'study')!r}, 'cpu', 1.0, jobs=2).run_all("
              f"[({str(stage)!r}, [{str(marks[0])!r}, '-'], 'a'), ({str(stage)!r}, [{str(marks[1])!r}, '-'], 'b')])\n")
    process = subprocess.Popen([sys.executable, "-c", runner], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        assert wait_for(lambda: all(m.exists() and m.read_text() for m in marks), 60), "the stages did not start"
        pids = [int(m.read_text()) for m in marks]
        process.kill()
        process.wait(30)
        assert wait_for(lambda: not any(running(pid) for pid in pids), 10), [command_line(p) for p in pids]
        assert all((tmp_path / (m.name + ".stopped")).read_text() == "SIGTERM" for m in marks)
    finally:
        process.kill()
        for mark in marks:
            if mark.exists() and mark.read_text() and running(int(mark.read_text())):
                os.kill(int(mark.read_text()), signal.SIGKILL)


def test_a_killed_torchrun_rank_stops_the_other_in_one_sentence_and_nothing_is_left(tmp_path, shapes_dir):
    """kill -9 of one rank of a two-rank torchrun job (an out-of-memory kill, a lost node): the other rank ends with
    one sentence naming the checkpoint the run keeps (the lost peer, or torchrun's SIGTERM, whichever reaches it
    first), no traceback of ours, and no process of the job is left: ranks, their loader workers, forkservers and
    resource trackers."""
    marker = f"MSF_TEST_RUN={uuid.uuid4().hex}"
    config = write_vae_config(tmp_path, shapes_dir, steps=2000, val_every=2, num_workers=1, val_samples=4,
                              log_every=100)
    env = dict(os.environ, OMP_NUM_THREADS="1", **dict([marker.split("=", 1)]))
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                "pretrain_vae.py", config, "--device", "cpu"], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: any(n.startswith("ckpt_") for n in os.listdir(tmp_path / "run"))
                        if (tmp_path / "run").is_dir() else False, 180), "no checkpoint within 180 s"
        job = descendants(process.pid)
        ranks = {int(environment_of(pid).get(b"RANK", b"-1")): pid for pid in job
                 if b"pretrain_vae.py" in open(f"/proc/{pid}/cmdline", "rb").read()}
        assert {0, 1} <= set(ranks), [command_line(pid) for pid in job]
        os.kill(ranks[1], signal.SIGKILL)
        _, err = process.communicate(timeout=180)
        ours = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(ours) == 1, err[-3000:]
        assert ("another rank of this torchrun job stopped or stalled" in ours[0] or
                ours[0].startswith("error: stopped by SIGTERM; ")), ours[0]
        assert "continue from it with --resume auto" in ours[0], ours[0]
        assert 'pretrain_vae.py", line' not in err, err[-3000:]  # torchrun's own report may follow, ours may not
        assert wait_for(lambda: not processes_marked(marker) and not any(running(pid) for pid in job), 10), \
            [command_line(pid) for pid in set(processes_marked(marker)) | job if running(pid)]
    finally:
        for pid in processes_marked(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(30)
