"""Trained models rebuilt from their checkpoints, for evaluate.py and the Python API (api.py)."""

import contextlib
import os
import sys
import warnings

import msf
from common import UserError, load_checkpoint, load_weights, resolve_stored_path
from model import build_model


def load_for_evaluation(path: str, device):
    """(model, checkpoint dict) rebuilt from a checkpoint's own config: an OCL model (kind 'ocl') with its frozen
    VAE and DINO weights taken from the checkpoint, or a VAE (kind 'vae'). A run directory means its best.pt
    (OCL) or its latest checkpoint."""
    chosen = path
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "best.pt")):
        path = chosen = os.path.join(path, "best.pt")
    state = load_checkpoint(path)
    if os.path.isdir(chosen) and state["kind"] == "ocl":  # an OCL run without best.pt: say what is evaluated instead
        print(f"note: {chosen} holds no best.pt; evaluating its latest checkpoint {state['path']} (give a "
              f"checkpoint file to choose another)", file=sys.stderr)
    # Stored paths are relative to where training ran: resolve them against the checkpoint's own location.
    out_dir = state["config"].get("out_dir", "")
    if state.get("data", {}).get("data_dir"):
        state["data"] = dict(state["data"], data_dir=resolve_stored_path(state["data"]["data_dir"], state["path"],
                                                                          out_dir))
    if state.get("vae_ckpt"):
        state["vae_ckpt"] = resolve_stored_path(state["vae_ckpt"], state["path"], out_dir)
    if state["kind"] == "vae":
        with _older_config_error(state):
            vae = msf.build_vae(state["config"])
        load_weights(vae, state["model"], state["path"])
        return vae.to(device).eval(), state
    if state["kind"] != "ocl":
        raise UserError(f"{state['path']} is a {state['kind']} checkpoint; give an OCL (train_ocl.py) or a VAE "
                        f"(pretrain_vae.py) checkpoint")
    config = dict(state["config"], dino_pretrained=False, dino_weights="")  # DINO's weights are in the checkpoint
    with _older_config_error(state), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DINO is RANDOMLY")
        vae = msf.build_vae(state["vae_config"]) if state.get("vae_config") else None
        model = build_model(config, state["video"], vae)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"{state['path']} does not fit the model its own config describes "
                        f"({str(error).splitlines()[0][:200]})") from None
    return model.to(device).eval(), state


@contextlib.contextmanager
def _older_config_error(state: dict):
    """A checkpoint from an older version may lack a key its model needs now: say so in one sentence (filling it
    with today's default could rebuild a different model without a word)."""
    try:
        yield
    except KeyError as error:
        key = error.args[0] if error.args else None
        if key in state["config"] or key in (state.get("vae_config") or {}):
            raise  # not a missing config key: a bug, keep its traceback
        raise UserError(f"{state['path']} was written by an older version: its config lacks {key!r}; "
                        f"retrain, or add it to the checkpoint's config with the value it was trained with") from None
