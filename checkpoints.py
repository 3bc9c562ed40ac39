"""Trained models rebuilt from their checkpoints, for evaluate.py and the Python API (api.py), and the one rule for
checkpoints written by older versions (`complete_config`), which train_ocl.py applies to its guidance VAE too."""

import os
import sys
import warnings

import msf
from errors import UserError
from model import OCL_OPTIONS, build_model
from runs import checkpoint_kind, load_checkpoint, load_weights, resolve_stored_path

# Options added after checkpoints of this project existed whose defaults are what the code did before them, so a
# checkpoint without one was trained with its default. Any other key a checkpoint lacks is refused, because its
# default may not be what the checkpoint was trained with (beta_start, beta_end and diffusion_target changed the
# behaviour when they came).
ADDED_WITH_THE_OLD_BEHAVIOUR_AS_DEFAULT = (
    "vae_losses", "pyramid", "vae_norm",  # msf.VAE_OPTIONS
    "guidance_noise", "query_sigma_anneal_fraction", "sa_truncation", "denoiser_ema",  # model.OCL_OPTIONS
    "mixture_decoder", "mixture_target", "mixture_hidden",  # read only by the mixture method, which came with them
    "video_queries",  # model.OCL_OPTIONS: video checkpoints before it started from the boxes, its default
)


def old_defaults(options: dict) -> dict:
    """{key: default} of the ADDED_WITH_THE_OLD_BEHAVIOUR_AS_DEFAULT keys among `options`: what a checkpoint that
    lacks one was trained with. The trainers compare a resumed checkpoint's config completed with these."""
    return {key: options[key].default for key in ADDED_WITH_THE_OLD_BEHAVIOUR_AS_DEFAULT if key in options}


def complete_config(config: dict, options: dict, path: str) -> dict:
    """A checkpoint's model config (`options`: msf.VAE_OPTIONS or model.OCL_OPTIONS) completed for today's code:
    keys of ADDED_WITH_THE_OLD_BEHAVIOUR_AS_DEFAULT that it lacks take their defaults; any other missing key is
    refused in one sentence (filling it with today's default could rebuild a different model without a word)."""
    missing = [key for key in options if key not in config]
    refused = [key for key in missing if key not in ADDED_WITH_THE_OLD_BEHAVIOUR_AS_DEFAULT]
    if refused:
        raise UserError(f"{path} was written by an older version: its config lacks {refused[0]!r}; retrain, or add "
                        f"it to the checkpoint's config with the value it was trained with")
    return {**old_defaults(options), **config}  # every key it lacks now has an old default


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
        vae = msf.build_vae(complete_config(state["config"], msf.VAE_OPTIONS, state["path"]))
        load_weights(vae, state["model"], state["path"])
        return vae.to(device).eval(), state
    if state["kind"] != "ocl":
        raise UserError(f"{state['path']} is {checkpoint_kind(state['kind'])}; give an OCL (train_ocl.py) or a VAE "
                        f"(pretrain_vae.py) checkpoint")
    config = complete_config(state["config"], OCL_OPTIONS, state["path"])
    config.update(dino_pretrained=False, dino_weights="")  # DINO's weights are in the checkpoint
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DINO is RANDOMLY")
        vae = None
        if state.get("vae_config"):
            vae = msf.build_vae(complete_config(state["vae_config"], msf.VAE_OPTIONS, state["path"]))
        model = build_model(config, state["video"], vae)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"{state['path']} does not fit the model its own config describes "
                        f"({str(error).splitlines()[0][:200]})") from None
    return model.to(device).eval(), state
