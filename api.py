"""A small Python API for trained models: load a VAE or an OCL model from a checkpoint or a run directory, use a
VAE as a tokenizer (image -> code indices -> image), and get an OCL model's slots and masks.

    import api
    vae = api.load("runs/vae_msf_shapes")      # VAETokenizer
    ids = vae.tokenize(images)                  # images: (b, 3, H, W) float in [-1, 1]
    recon = vae.detokenize(ids)
    ocl = api.load("runs/slate_msf_shapes")    # OCLModel wrapper
    slots, masks = ocl.slots_and_masks(images)
    result = ocl.segment(["photo.jpg"])         # image files of any size: slots, masks, segments, reconstruction

Paths stored inside a checkpoint (the dataset, the guidance VAE) are resolved against the checkpoint's own
location, so a run works from any directory (README, "Python API").
"""

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import msf
from checkpoints import load_for_evaluation
from data import resize_pixels
from errors import UserError
from model import BoxQueries, DiffusionDecoder, MixtureLoss


RANGE_SLACK = 0.05  # antialiased resizing overshoots [-1, 1] a little; pixels in 0-255 or 0-1 do not fit otherwise


def checked_images(images, dims: int, side: int = None, multiple: int = None) -> torch.Tensor:
    """`images` if they are what the models take, a finite float tensor (b, 3, H, W) (dims 4; videos (b, T, 3, H, W))
    in [-1, 1], `side` x `side` or H and W multiples of `multiple`; else a ValueError that says what is expected."""
    layout = "(b, 3, H, W)" if dims == 4 else "(b, T, 3, H, W)"
    if not torch.is_tensor(images) or images.dim() != dims or images.shape[-3] != 3:
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a tensor {layout} of RGB images, got {got}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [-1, 1] (pixel / 127.5 - 1), got dtype {images.dtype}")
    height, width = images.shape[-2:]
    if side is not None and (height, width) != (side, side):
        raise ValueError(f"images must be {side}x{side}, the model's resolution, got {height}x{width}")
    if multiple is not None and (height % multiple or width % multiple or min(height, width) == 0):
        raise ValueError(f"image height and width must be multiples of {multiple} (4 x 2^(scales - 1)), got "
                         f"{height}x{width}")
    if images.numel() and not bool(torch.isfinite(images).all()):
        raise ValueError("images hold NaN or infinite values")
    if images.numel():
        low, high = float(images.min()), float(images.max())
        if low < -1 - RANGE_SLACK or high > 1 + RANGE_SLACK:
            raise ValueError(f"images must be in [-1, 1] (pixel / 127.5 - 1), got values from {low:.4g} to {high:.4g}")
    return images


def _open_image(item, index: int) -> tuple:
    """(PIL image, its name for notes) of a path or a PIL image; a file that is missing or that PIL cannot decode
    raises UserError naming it."""
    if isinstance(item, Image.Image):
        return item, os.path.basename(getattr(item, "filename", "") or "") or f"image {index}"
    path = os.fspath(item)
    if not os.path.isfile(path):
        raise UserError(f"{path} is not an image file (it does not exist or is a directory)")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a broken file fails here, by name, before anything is written
            return opened.copy(), os.path.basename(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # unknown, broken, huge files
        reason = str(error).split(" '")[0] or type(error).__name__  # without the path Pillow repeats
        raise UserError(f"{path} is not an image PIL can decode ({reason}); give PNG, JPEG, BMP or WebP files") \
            from None


def _prepared(picture: Image.Image, name: str, resolution: int) -> tuple:
    """One PIL image as the model's input (3, R, R) in [-1, 1], and a note of what was done to it."""
    width, height = picture.size
    steps = []
    if picture.getexif().get(0x0112, 1) != 1:  # a photo taken sideways: the EXIF orientation tag turns it upright
        picture = ImageOps.exif_transpose(picture)
        steps.append("turned upright (EXIF orientation)")
    if picture.mode.startswith("I"):  # 16-bit greyscale, which Pillow's RGB conversion would clip at 255
        values = np.asarray(picture, dtype=np.float64)
        picture = Image.fromarray(np.clip(values / (257.0 if values.max() > 255 else 1.0), 0, 255).astype(np.uint8))
        steps.append("16-bit grey scaled to 8 bits")
    if picture.mode != "RGB":
        transparent = "A" in picture.getbands() or "transparency" in picture.info
        steps.append(f"{picture.mode} converted to RGB" + (" on white" if transparent else ""))
        if transparent:  # transparent pixels keep arbitrary colours underneath: show them as a white background
            picture = Image.alpha_composite(Image.new("RGBA", picture.size, "white"), picture.convert("RGBA"))
        picture = picture.convert("RGB")
    pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float()
    side = min(pixels.shape[1:])
    top, left = (pixels.shape[1] - side) // 2, (pixels.shape[2] - side) // 2
    if pixels.shape[1] != pixels.shape[2]:
        pixels = pixels[:, top:top + side, left:left + side]
        steps.append(f"centre-cropped to {side}x{side}")
    if side != resolution:  # as the datasets' images were resized
        pixels = resize_pixels(pixels, resolution)
        steps.append(f"resized to {resolution}x{resolution}")
    done = ", ".join(steps[:-1]) + " and " + steps[-1] if len(steps) > 1 else (steps[0] if steps else "used as it is")
    return (pixels / 127.5 - 1).clamp(-1, 1), f"{name}: {width}x{height} {done}"


def read_images(images, resolution: int) -> tuple:
    """Image files (paths; PNG, JPEG, BMP, WebP, anything PIL decodes) or PIL images of any size and mode ->
    (tensor (b, 3, R, R) in [-1, 1], notes): each turned upright (EXIF), converted to RGB, centre-cropped to a square
    and resized to `resolution` R (bilinear, antialiased); notes say per image what was done, e.g. "photo.jpg:
    640x480 centre-cropped to 480x480 and resized to 32x32". Every file is decoded before any is returned, so a
    file that is not an image stops the call (UserError naming it) before anything is done with the others."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        images = [images]
    if not len(images):
        raise UserError("no images given")
    prepared = [_prepared(*_open_image(item, index), resolution) for index, item in enumerate(images)]
    return torch.stack([pixels for pixels, _ in prepared]), [note for _, note in prepared]


def load(path: str, device: str = "cpu"):
    """A trained model from a checkpoint file or a run directory (an OCL run: its best.pt, else the latest
    checkpoint; a VAE run: the latest checkpoint): a `VAETokenizer` for pretrain_vae.py checkpoints, an
    `ObjectCentric` for train_ocl.py checkpoints. Both are in eval mode on `device`."""
    device = torch.device(device)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        visible = f"{torch.cuda.device_count()} CUDA GPU(s) are visible" if torch.cuda.is_available() else \
            "no CUDA GPU is visible"
        raise ValueError(f"device {str(device)!r} was asked for but {visible} here; load with device='cpu'")
    model, state = load_for_evaluation(path, device)
    if state["kind"] == "vae":
        return VAETokenizer(model, state)
    return ObjectCentric(model, state)


class VAETokenizer:
    """A pretrained VAE (vq, grouped or msf) as an image tokenizer.

    Images are (b, 3, H, W) float RGB in [-1, 1] (the data's range: pixel / 127.5 - 1), H and W the VAE's
    `resolution` (or any multiple of 4·2^(num_scales-1)). Scale n (1-based) has a (H / 4 / 2^(n-1)) x
    (W / 4 / 2^(n-1)) token grid."""

    def __init__(self, vae: msf.VAE, state: dict):
        self.vae, self.state, self.config = vae, state, vae.config
        self.resolution = state["data"]["resolution"]
        self.num_scales = vae.num_scales
        self.device = next(vae.parameters()).device

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> list:
        """(b, 3, H, W) in [-1, 1] -> one LongTensor (b, h_n, w_n, G) per scale: the code index of each group.
        vq: G = 1 (codebook index); grouped: G = num_groups (one index per group codebook); msf: G = 2, the
        shared scale-invariant index i (into the one shared codebook) and the scale-specific index j (into scale
        n's scale-variant codebook), or G = 1 (i only) with intra_scale_fusion off. Argmax matching, no noise."""
        images = checked_images(images, 4, multiple=4 * 2 ** (self.num_scales - 1))
        if not images.shape[0]:  # an empty batch (checked_images takes it): empty ids of every scale
            height, width = images.shape[-2:]
            return [torch.zeros((0, height // 4 // 2 ** n, width // 4 // 2 ** n, len(sizes)), dtype=torch.long,
                                device=self.device) for n, sizes in enumerate(self.vocabulary())]
        return [ids.clone() for ids in self.vae.quantize(images.to(self.device).float()).indices]

    def vocabulary(self) -> list:
        """Per scale, the codebook size of each group: ids[n][..., g] lies in [0, vocabulary()[n][g])."""
        if getattr(self, "_vocabulary", None) is None:
            side = 4 * 2 ** (self.num_scales - 1)
            probe = torch.zeros(1, 3, side, side, device=self.device)
            with torch.no_grad():
                self._vocabulary = self.vae.quantize(probe).group_sizes
        return [list(sizes) for sizes in self._vocabulary]

    @torch.no_grad()
    def vectors(self, ids: torch.Tensor, scale: int = 1) -> torch.Tensor:
        """(b, h, w, G) code indices of `scale` -> the discrete representation X_n (b, h, w, c) the decoder and the
        OCL models see. msf: X_n = concat(C_si[i], C_sv_n[j])·W (fusion concat_pinv), (C_si[i] + C_sv_n[j]) / 2
        (fusion mean) or C_si[i] (no intra-scale fusion); grouped: concat(C_1[i_1], ..., C_G[i_G])·W; vq: C[i]."""
        if not 1 <= scale <= self.num_scales:
            raise ValueError(f"scale must be 1 to {self.num_scales}, got {scale}")
        sizes = self.vocabulary()[scale - 1]
        if not torch.is_tensor(ids) or ids.is_floating_point() or ids.is_complex() or ids.dim() != 4 \
                or ids.shape[-1] != len(sizes):
            got = f"{ids.dtype} {tuple(ids.shape)}" if torch.is_tensor(ids) else type(ids).__name__
            raise ValueError(f"scale {scale} ids must be an integer tensor (b, h, w, {len(sizes)}) as tokenize gives, "
                             f"got {got}")
        for group, size in enumerate(sizes):
            column = ids[..., group]
            if column.numel() and (int(column.min()) < 0 or int(column.max()) >= size):
                raise ValueError(f"scale {scale} ids of group {group} must lie in [0, {size}), got values from "
                                 f"{int(column.min())} to {int(column.max())}")
        ids = ids.to(self.device).long()
        q = self.vae.quantizer
        if self.vae.kind == "vq":
            return q.codebook.codes()[ids[..., 0]]
        if self.vae.kind == "grouped":
            return q.project.down(torch.cat([book.codes()[ids[..., g]] for g, book in enumerate(q.groups)], -1))
        shared = q.si.codes()[ids[..., 0]]
        if not q.intra:
            return shared
        specific = q._sv_codebook(scale - 1).codes()[ids[..., 1]]
        if q.split:
            return q.project.down(torch.cat([shared, specific], -1))
        return (shared + specific) / 2

    @torch.no_grad()
    def detokenize(self, ids) -> list:
        """tokenize's output (a list, one (b, h_n, w_n, G) tensor per scale from scale 1; a single tensor means
        scale 1) -> one decoded image (b, 3, 4·h_n, 4·w_n) per scale, in about [-1, 1] (not clamped)."""
        if torch.is_tensor(ids):
            ids = [ids]
        if len(ids) > self.num_scales:
            raise ValueError(f"ids for {len(ids)} scales given, but the VAE has {self.num_scales}")
        return [self.vae.decode(self.vectors(scale_ids, n + 1)) for n, scale_ids in enumerate(ids)]


class ObjectCentric:
    """A trained OCL model (SLATE, SlotDiffusion, DINOSAUR, SysBinder, OGDR; STEVE on videos)."""

    def __init__(self, model, state: dict):
        self.model, self.state, self.config = model, state, model.config
        self.resolution = state["data"]["resolution"]
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def slots_and_masks(self, images: torch.Tensor, boxes: torch.Tensor = None) -> tuple:
        """Images (b, 3, H, W) float RGB in [-1, 1], at the model's `resolution` -> slots (b, s, d) and soft masks
        (b, s, H, W): Slot Attention's last-iteration attention (mixture decoders, DINOSAUR's included: the
        decoder's alphas), bilinearly upsampled to the image size, summing to 1 over the s slots at every pixel. The slot queries are their
        means (no sampling noise). Videos (STEVE, video checkpoints): (b, T, 3, H, W) with first-frame boxes
        (b, K, 4) -> slots (b, T, s, d), masks (b, T, s, H, W). argmax over s gives the segmentation the metrics
        score."""
        images = checked_images(images, 5 if self.model.video else 4, side=self.resolution).to(self.device).float()
        size = tuple(images.shape[-2:])
        if self.model.video and boxes is None and isinstance(self.model.queries, BoxQueries):
            raise ValueError("a video model needs the first frame's object boxes (b, K, 4), as its data has")
        slots, masks = self.model.slots_and_masks(images, 0.0, None if boxes is None else boxes.to(self.device))
        lead = masks.shape[:-2]
        upsampled = F.interpolate(masks.reshape(-1, *masks.shape[-3:]).float(), size=size, mode="bilinear",
                                  align_corners=False)
        return slots, upsampled.view(*lead, *size)

    @torch.no_grad()
    def segment(self, images, steps: int = 25) -> dict:
        """Segment images: a tensor (b, 3, H, W) in [-1, 1] at the model's `resolution`, or a list of image files /
        PIL images of any size, prepared by `read_images`. Returns {"images": the input as the model saw it,
        "slots" (b, s, d), "masks" (b, s, H, W) soft, summing to 1 over the slots, "segments" (b, H, W) their
        argmax, "reconstruction" (b, 3, H, W) in [-1, 1] or None, "reconstruction_note": what it is or why there
        is none, "notes": read_images' notes (None for a tensor)}. Image models only; `steps`: SlotDiffusion's DDIM
        steps for its reconstruction."""
        if self.model.video:
            raise ValueError("this is a video model (STEVE or a video checkpoint): segment takes images; give videos "
                             "with their first-frame boxes to slots_and_masks")
        notes = None
        if not torch.is_tensor(images):
            images, notes = read_images(images, self.resolution)
        slots, masks = self.slots_and_masks(images)
        images = images.to(self.device).float()
        reconstruction, how = self._reconstruction(images, slots, steps)
        return {"images": images, "slots": slots, "masks": masks, "segments": masks.argmax(1),
                "reconstruction": reconstruction, "reconstruction_note": how, "notes": notes}

    def _reconstruction(self, images: torch.Tensor, slots: torch.Tensor, steps: int) -> tuple:
        """(the image decoded from the slots (b, 3, H, W) in [-1, 1], or None; what it is, or why there is none)
        where the method has a cheap one: one pass of a mixture decoder, or SlotDiffusion's DDIM sampling."""
        decoder, size = self.model.decoder, tuple(images.shape[-2:])
        if isinstance(decoder, DiffusionDecoder):
            return self.model.reconstruct(images, slots, steps=steps), f"DDIM sampling from the slots ({steps} steps)"
        if not isinstance(decoder, MixtureLoss) or decoder.reads not in ("pixels", "guidance_vectors"):
            what = "DINO features" if getattr(decoder, "reads", "") == "features" else "the VAE's tokens one by one"
            return None, f"no reconstruction: {self.config['method']}'s decoder predicts {what}, not pixels"
        mixed, _ = decoder(slots)  # (b, P, D) on the decoder's grid, row-major
        side = math.isqrt(mixed.shape[1])
        grid = mixed.float().view(mixed.shape[0], side, side, -1)
        if decoder.reads == "pixels":
            picture, how = grid.permute(0, 3, 1, 2), "the mixture decoder's pixels"
        else:
            picture, how = self.model.vae.decode(grid), "the mixture decoder's guidance vectors, decoded by the VAE"
        if tuple(picture.shape[-2:]) != size:  # a coarser guidance scale decodes to a smaller image
            picture = F.interpolate(picture, size=size, mode="bilinear", align_corners=False)
        return picture.float().clamp(-1, 1), how
