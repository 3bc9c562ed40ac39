"""A small Python API for trained models: load a VAE or an OCL model from a checkpoint or a run directory, use a
VAE as a tokenizer (image -> code indices -> image), and get an OCL model's slots and masks.

    import api
    vae = api.load("runs/vae_msf_shapes")      # VAETokenizer
    ids = vae.tokenize(images)                  # images: (b, 3, H, W) float in [-1, 1]
    recon = vae.detokenize(ids)
    ocl = api.load("runs/slate_msf_shapes")    # OCLModel wrapper
    slots, masks = ocl.slots_and_masks(images)

Paths stored inside a checkpoint (the dataset, the guidance VAE) are resolved against the checkpoint's own
location, so a run works from any directory (README, "Python API").
"""

import torch
import torch.nn.functional as F

import msf
from checkpoints import load_for_evaluation


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


def load(path: str, device: str = "cpu"):
    """A trained model from a checkpoint file or a run directory (an OCL run: its best.pt, else the latest
    checkpoint; a VAE run: the latest checkpoint): a `VAETokenizer` for pretrain_vae.py checkpoints, an
    `ObjectCentric` for train_ocl.py checkpoints. Both are in eval mode on `device`."""
    model, state = load_for_evaluation(path, torch.device(device))
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
        if self.model.video and boxes is None:
            raise ValueError("a video model needs the first frame's object boxes (b, K, 4), as its data has")
        slots, masks = self.model.slots_and_masks(images, 0.0, None if boxes is None else boxes.to(self.device))
        lead = masks.shape[:-2]
        upsampled = F.interpolate(masks.reshape(-1, *masks.shape[-3:]).float(), size=size, mode="bilinear",
                                  align_corners=False)
        return slots, upsampled.view(*lead, *size)
