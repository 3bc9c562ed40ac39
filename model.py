"""Object-centric models (README, "Configs"): primary encoders, Slot Attention, decoders, and the OCL methods.

    SLATE          Slot Attention + autoregressive transformer decoder over the frozen VAE's tokens
    STEVE          SLATE per video frame, slots carried over by a transformer predictor
    SlotDiffusion  a slot-conditioned UNet denoising the VAE's c=4 latent (images and videos)
    DINOSAUR       an MLP broadcast decoder reconstructing frozen DINO features (no VAE guidance)
    SysBinder      block-slot attention + the SLATE decoder (on videos: + the STEVE recurrence)
    OGDR           SLATE guided by grouped (2-group) codes (on videos: STEVE guided so)

Every method takes `guidance: vq | grouped | msf` from the frozen VAE it is given, except DINOSAUR. Reading order: encoders, slot initialisation, Slot Attention, decoders, the model.
Token/feature tensors are (b, n, d); image tensors (b, 3, H, W); videos (b, T, 3, H, W).
"""

import copy
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import msf
from config import option
from errors import UserError
from schedules import cosine_anneal


# ================================================================================================================
# Primary encoders.

class SoftPositionEmbed(nn.Module):
    """Adds a learned linear map of the (x, y, 1-x, 1-y) grid to a feature map (Locatello et al. 2020)."""

    def __init__(self, dim: int):
        super().__init__()
        self.project = nn.Linear(4, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(b,d,h,w) -> (b,d,h,w)"""
        grid = position_grid(*features.shape[-2:], features.device).to(features.dtype)
        return features + self.project(grid).permute(2, 0, 1)[None]


class NaiveCNN(nn.Module):
    """The SAVi CNN (Kipf et al. 2022): four 5x5 convolutions with ReLU; the first log2(stride) ones stride 2."""

    def __init__(self, channels: int, out_dim: int, stride: int = 1):
        super().__init__()
        layers, strides = [], [2] * int(math.log2(stride)) + [1] * (4 - int(math.log2(stride)))
        in_channels = 3
        for i, s in enumerate(strides):
            last = i == len(strides) - 1
            layers += [nn.Conv2d(in_channels, out_dim if last else channels, 5, s, 2)]
            if not last:
                layers.append(nn.ReLU(inplace=True))
            in_channels = channels
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(b,3,H,W) -> (b,d,H/stride,W/stride), stored channels-last: its convolutions ran faster so on the CPU
        (`python bench.py conv_layout`), and the (b, h*w, d) tokens Slot Attention reads are then a view of it."""
        return self.net(msf.channels_last(images))


def load_dino(config: dict) -> nn.Module:
    """The frozen DINO ViT from timm: pretrained from the hub, from `dino_weights`, or random (loudly). timm is
    imported here, not with the module: it takes seconds (torchvision with it), and every process that imports this
    module without a DINO encoder, loader workers included, would pay them."""
    import timm

    image_size = config["resolution"]
    kwargs = dict(img_size=image_size, num_classes=0, dynamic_img_size=True)
    if config["dino_depth"]:
        kwargs["depth"] = config["dino_depth"]
    pretrained = config["dino_pretrained"] and not config["dino_weights"]
    try:
        vit = timm.create_model(config["dino_model"], pretrained=pretrained, **kwargs)
    except Exception as error:
        if not pretrained:
            raise
        raise UserError(f"could not load pretrained {config['dino_model']} from the timm hub ({type(error).__name__}:"
                        f" {str(error)[:120]}); when offline, download the weights elsewhere and set "
                        f"dino_weights: PATH, or set dino_pretrained: false to train with a random DINO") from None
    if config["dino_weights"]:
        load_vit_weights(vit, config["dino_weights"])
    elif not pretrained:
        warnings.warn("DINO is RANDOMLY INITIALISED (dino_pretrained: false and no dino_weights): the big-little "
                      "encoder's DINO branch carries no pretrained features; results will not match the paper",
                      stacklevel=2)
    vit.requires_grad_(False).eval()
    return vit


def dino_input_statistics(vit: nn.Module) -> tuple:
    """The per-channel (mean, std) of [0, 1] pixels the ViT's weights were trained with: timm's pretrained config of
    the model (ImageNet's for DINO and DINOv2), timm's ImageNet defaults if the model carries none."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(vit, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def load_vit_weights(vit: nn.Module, path: str) -> None:
    """Load a timm or official DINO state dict into `vit`, resampling the position embedding to its grid."""
    from timm.layers import resample_abs_pos_embed

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"dino_weights {path} is not a readable state dict ({type(error).__name__})") from None
    for key in ("model", "state_dict", "teacher", "student"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
        grid = vit.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=1)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing:
        raise UserError(f"dino_weights {path} does not fit {type(vit).__name__}: missing {missing[:5]}")


class BigLittleEncoder(nn.Module):
    """The paper's primary encoder (appendix A.1): dino(x) -> conv3x3 -> upsample, added to a naive CNN branch,
    so a 128-px input still gives a high-resolution feature map; DINO stays frozen. The data is in [-1, 1]; only
    the DINO branch converts it to the ImageNet-normalised pixels DINO was trained on (the CNN branch and the VAE
    keep [-1, 1])."""

    def __init__(self, config: dict, out_dim: int):
        super().__init__()
        self.dino = load_dino(config)
        mean, std = dino_input_statistics(self.dino)  # a function of dino_model: not saved in checkpoints
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.patch = self.dino.patch_embed.patch_size[0]
        self.stride = config["encoder_stride"]
        self.project = nn.Conv2d(self.dino.num_features, out_dim, 3, 1, 1)
        self.cnn = NaiveCNN(config["cnn_channels"], out_dim, self.stride)

    def train(self, mode: bool = True):
        super().train(mode)
        self.dino.eval()  # frozen: no dropout, fixed norms
        return self

    def dino_input(self, images: torch.Tensor) -> torch.Tensor:
        """(b,3,H,W) pixels in [-1, 1] -> [0, 1] -> (x - mean) / std, the ViT's input."""
        return ((images + 1) / 2 - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def dino_features(self, images: torch.Tensor) -> torch.Tensor:
        """(b,3,H,W) in [-1, 1] -> (b, D, H/patch, W/patch) frozen DINO patch features (also DINOSAUR's targets)."""
        tokens = self.dino.forward_features(self.dino_input(images))[:, self.dino.num_prefix_tokens:]  # (b, h*w, D)
        h, w = images.shape[-2] // self.patch, images.shape[-1] // self.patch
        return tokens.transpose(1, 2).reshape(images.shape[0], -1, h, w)

    def forward(self, images: torch.Tensor, dino_features: torch.Tensor = None) -> torch.Tensor:
        """(b,3,H,W) -> (b,d,H/stride,W/stride)"""
        if dino_features is None:
            dino_features = self.dino_features(images)
        big = F.interpolate(self.project(dino_features), scale_factor=self.patch // self.stride, mode="nearest")
        return big + self.cnn(images)


class FeatureEncoder(nn.Module):
    """Primary encoder + position embedding + LayerNorm + MLP: images -> SA inputs (b, h*w, d)."""

    def __init__(self, config: dict):
        super().__init__()
        dim = config["slot_dim"]
        if config["encoder"] == "dino_biglittle":
            self.backbone = BigLittleEncoder(config, dim)
        else:
            self.backbone = NaiveCNN(config["cnn_channels"], dim, config["encoder_stride"])
        self.position = SoftPositionEmbed(dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, images: torch.Tensor, dino_features: torch.Tensor = None) -> tuple:
        """Returns SA inputs (b, h*w, d) and the feature grid (h, w)."""
        if isinstance(self.backbone, BigLittleEncoder):
            features = self.backbone(images, dino_features)
        else:
            features = self.backbone(images)
        features = F.relu(self.position(features))
        h, w = features.shape[-2:]
        tokens = self.norm(features.flatten(2).transpose(1, 2))
        return self.mlp(tokens), (h, w)


# ================================================================================================================
# Slot initialisation.

class GaussianQueries(nn.Module):
    """Learned Gaussian means, one per slot, with a shared non-trainable sigma given by the caller (cosine-annealed
    1 -> 0 over training, 0 at evaluation; appendix A.3)."""

    def __init__(self, num_slots: int, dim: int):
        super().__init__()
        self.mean = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_slots, dim)))

    def forward(self, batch_size: int, sigma: float) -> torch.Tensor:
        """-> (b, s, d)"""
        queries = self.mean[None].expand(batch_size, -1, -1)
        if sigma > 0:
            queries = queries + sigma * torch.randn_like(queries)
        return queries


class BoxQueries(nn.Module):
    """Conditional initialisation for video: first-frame boxes (normalised ltrb, zero-padded to the slot count)
    through a 2-layer GELU MLP."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        """(b, s, 4) -> (b, s, d)"""
        return self.mlp(boxes)


def boxes_for_slots(boxes: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(b, K, 4) object boxes -> (b, num_slots, 4): truncated or zero-padded (slot k <-> object k)."""
    b, k, _ = boxes.shape
    if k >= num_slots:
        return boxes[:, :num_slots]
    return torch.cat([boxes, boxes.new_zeros(b, num_slots - k, 4)], 1)


# ================================================================================================================
# Slot Attention (Locatello et al. 2020) and block-slot attention (SysBinder, Singh et al. 2022b).

class SlotAttention(nn.Module):
    """Standard Slot Attention: softmax over slots, weighted mean over inputs, GRU update, residual MLP."""

    def __init__(self, dim: int, iterations: int = 3, mlp_dim: int = 0, eps: float = 1e-8, slot_update: bool = True,
                 truncation: str = "none"):
        """`slot_update=False` leaves out the GRU and MLP, for a subclass that brings its own (BlockSlotAttention).
        `truncation="bi-level"`: BO-QSA (Jia et al. 2023), as the MSF release trains: the iterations before the last
        run without gradient, and the last one passes its gradient straight through to the initial slots."""
        super().__init__()
        if truncation not in ("none", "bi-level"):
            raise ValueError(f"unknown truncation {truncation!r}: use 'none' or 'bi-level'")
        self.dim, self.iterations, self.eps, self.truncation = dim, iterations, eps, truncation
        self.norm_inputs, self.norm_slots, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        if slot_update:
            self.gru = nn.GRUCell(dim, dim)
            self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim or 2 * dim), nn.ReLU(inplace=True),
                                     nn.Linear(mlp_dim or 2 * dim, dim))

    def attend(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """One attention step: (b,s,d) slots -> updates (b,s,d) and attention (b,s,n), softmax over slots."""
        q = self.to_q(self.norm_slots(slots))
        logits = torch.einsum("bsd,bnd->bsn", q, k) / math.sqrt(self.dim)
        attention = logits.softmax(dim=1)  # slots compete for each input
        weights = attention + self.eps
        updates = torch.einsum("bsn,bnd->bsd", weights / weights.sum(-1, keepdim=True), v)
        return updates, attention

    def update(self, slots: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        b, s, d = slots.shape
        slots = self.gru(updates.reshape(-1, d), slots.reshape(-1, d)).view(b, s, d)
        return slots + self.mlp(self.norm_mlp(slots))

    def forward(self, inputs: torch.Tensor, slots: torch.Tensor, iterations: int = None) -> tuple:
        """inputs (b,n,d), initial slots (b,s,d) -> slots (b,s,d), attention of the last iteration (b,s,n)."""
        inputs = self.norm_inputs(inputs)
        k, v = self.to_k(inputs), self.to_v(inputs)
        attention, initial = None, slots
        iterations = iterations or self.iterations
        for iteration in range(iterations):
            if self.truncation == "bi-level" and iteration == iterations - 1:
                slots = slots.detach() + initial - initial.detach()  # values of slots, gradient of the queries
            updates, attention = self.attend(slots, k, v)
            slots = self.update(slots, updates)
        return slots, attention


class BlockGRU(nn.Module):
    """M independent GRU cells, one per block of the slot vector (SysBinder's block-wise update)."""

    def __init__(self, dim: int, blocks: int):
        super().__init__()
        self.blocks, self.block_dim = blocks, dim // blocks
        self.weight_ih = nn.Parameter(torch.randn(blocks, self.block_dim, 3 * self.block_dim) / math.sqrt(self.block_dim))
        self.weight_hh = nn.Parameter(torch.randn(blocks, self.block_dim, 3 * self.block_dim) / math.sqrt(self.block_dim))
        self.bias_ih = nn.Parameter(torch.zeros(blocks, 3 * self.block_dim))
        self.bias_hh = nn.Parameter(torch.zeros(blocks, 3 * self.block_dim))

    def forward(self, inputs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """(n, M*k) inputs and hidden -> (n, M*k), each block through its own GRU equations."""
        n = inputs.shape[0]
        x = inputs.view(n, self.blocks, self.block_dim)
        h = hidden.view(n, self.blocks, self.block_dim)
        gi = torch.einsum("nmk,mkj->nmj", x, self.weight_ih) + self.bias_ih
        gh = torch.einsum("nmk,mkj->nmj", h, self.weight_hh) + self.bias_hh
        r_i, z_i, n_i = gi.chunk(3, -1)
        r_h, z_h, n_h = gh.chunk(3, -1)
        reset, keep = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
        candidate = torch.tanh(n_i + reset * n_h)
        return ((1 - keep) * candidate + keep * h).reshape(n, -1)


class BlockSlotAttention(SlotAttention):
    """SysBinder: slot attention whose slots are M blocks, each updated by its own GRU and MLP and then bound to a
    learned library of prototypes for that block (soft attention over the block's prototypes)."""

    def __init__(self, dim: int, iterations: int, blocks: int, prototypes: int, truncation: str = "none"):
        super().__init__(dim, iterations, slot_update=False, truncation=truncation)
        if dim % blocks:
            raise UserError(f"slot_dim {dim} must be divisible by sysbinder_blocks {blocks}")
        self.blocks, self.block_dim = blocks, dim // blocks
        self.gru = BlockGRU(dim, blocks)
        self.block_mlp_in = nn.Parameter(torch.randn(blocks, self.block_dim, 4 * self.block_dim) / math.sqrt(self.block_dim))
        self.block_mlp_out = nn.Parameter(torch.zeros(blocks, 4 * self.block_dim, self.block_dim))
        self.prototypes = nn.Parameter(torch.randn(blocks, prototypes, self.block_dim))
        self.norm_binding = nn.LayerNorm(self.block_dim)

    def update(self, slots: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
        b, s, d = slots.shape
        slots = self.gru(updates.reshape(-1, d), slots.reshape(-1, d)).view(b, s, self.blocks, self.block_dim)
        hidden = torch.einsum("bsmk,mkj->bsmj", self.norm_mlp(slots.reshape(b, s, d)).view_as(slots),
                              self.block_mlp_in)
        slots = slots + torch.einsum("bsmj,mjk->bsmk", F.relu(hidden), self.block_mlp_out)
        # Binding: each block is re-expressed as a convex combination of its own prototypes.
        logits = torch.einsum("bsmk,mpk->bsmp", self.norm_binding(slots), self.prototypes) / math.sqrt(self.block_dim)
        bound = torch.einsum("bsmp,mpk->bsmk", logits.softmax(-1), self.prototypes)
        return bound.reshape(b, s, d)


# ================================================================================================================
# Decoders.

class TransformerDecoder(nn.Module):
    """SLATE's decoder: autoregressive over the VAE tokens (teacher forcing with a causal mask), slots as the
    cross-attention memory; predicts each token's code index (one combined head, or one head per group)."""

    def __init__(self, code_dim: int, memory_dim: int, dim: int, layers: int, heads: int, dropout: float,
                 lengths: list, vocabularies: list, grouped: bool = False):
        """lengths[i]: tokens of guidance scale i; vocabularies[i]: list of group sizes of scale i."""
        super().__init__()
        self.lengths = lengths
        total = sum(lengths)
        self.embed = nn.Linear(code_dim, dim)
        self.bos = nn.Parameter(torch.randn(1, 1, dim) * dim ** -0.5)
        self.position = nn.Parameter(torch.randn(1, total, dim) * 0.02)
        self.memory = nn.Sequential(nn.Linear(memory_dim, dim), nn.LayerNorm(dim))
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(dim))
        self.register_buffer("causal", torch.triu(torch.full((total, total), float("-inf")), 1), persistent=False)
        # Readout per guidance scale: one head over the combined vocabulary, or one per group (only the heads the
        # loss uses exist, so DDP sees no unused parameters).
        self.grouped = grouped
        if grouped:
            self.heads = nn.ModuleList([nn.ModuleList([nn.Linear(dim, g) for g in v]) for v in vocabularies])
        else:
            self.heads = nn.ModuleList([nn.Linear(dim, math.prod(v)) for v in vocabularies])

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """tokens (b, L, code_dim) VAE vectors, memory (b, s, memory_dim) -> hidden states (b, L, dim)."""
        x = torch.cat([self.bos.expand(tokens.shape[0], -1, -1), self.embed(tokens[:, :-1])], 1) + self.position
        return self.transformer(x, self.memory(memory), tgt_mask=self.causal, tgt_is_causal=True)

    def token_losses(self, hidden: torch.Tensor, indices: list, vocabularies: list) -> torch.Tensor:
        """Cross-entropy of each token's code index (n, L), the guidance scales' tokens one after the other; with
        grouped targets, the groups' cross-entropies summed (the official code's loss). indices[i]: (n, L_i, G)."""
        per_scale, start = [], 0
        for head, length, index, groups in zip(self.heads, self.lengths, indices, vocabularies):
            h = hidden[:, start:start + length]
            start += length
            if self.grouped:
                ce = sum(F.cross_entropy(group_head(h).flatten(0, 1).float(), index[..., g].reshape(-1),
                                         reduction="none") for g, group_head in enumerate(head))
            else:
                ce = F.cross_entropy(head(h).flatten(0, 1).float(), combined_index(index, groups).reshape(-1),
                                     reduction="none")
            per_scale.append(ce.view(h.shape[0], length))
        return torch.cat(per_scale, 1)

    def loss(self, hidden: torch.Tensor, indices: list, vocabularies: list) -> torch.Tensor:
        """The training loss: `token_losses` averaged over all tokens of all guidance scales."""
        return self.token_losses(hidden, indices, vocabularies).mean()


def combined_index(indices: torch.Tensor, group_sizes: list) -> torch.Tensor:
    """(…, G) group indices -> (…) index into the product vocabulary, e.g. I_si * |C_sv| + I_sv."""
    combined = torch.zeros_like(indices[..., 0])
    for g, size in enumerate(group_sizes):
        combined = combined * size + indices[..., g]
    return combined


class TokenDecoder(TransformerDecoder):
    """The token decoder family (SLATE, STEVE, SysBinder, OGDR): the transformer above, teacher-forced on the frozen
    VAE's guidance tokens and cross-attending the slots (SysBinder: every block of every slot is one memory token,
    told apart by a learned block embedding). It reads the guidance; the masks are Slot Attention's."""

    reads = "guidance"

    def __init__(self, code_dim: int, slot_dim: int, config: dict, lengths: list, vocabularies: list, blocks: int = 0):
        super().__init__(code_dim, slot_dim // blocks if blocks else slot_dim, config["decoder_dim"],
                         config["decoder_layers"], config["decoder_heads"], config["decoder_dropout"], lengths,
                         vocabularies, grouped=config["slate_loss"] == "grouped")
        self.vocabularies, self.blocks = vocabularies, blocks
        if blocks:
            self.block_embedding = nn.Parameter(torch.randn(1, 1, blocks, slot_dim // blocks) * 0.02)

    def memory_of(self, slots: torch.Tensor) -> torch.Tensor:
        """(n,s,d) slots -> cross-attention memory: the slots, or SysBinder's blocks as separate tokens."""
        if not self.blocks:
            return slots
        n, s, d = slots.shape
        return (slots.view(n, s, self.blocks, -1) + self.block_embedding).flatten(1, 2)

    def decode_loss(self, guidance: dict, slots: torch.Tensor, other_slots: torch.Tensor = None) -> tuple:
        """(loss, stats, None); with `other_slots`, stats add the loss from them and the per-token gain (n, L_1) of
        the first guidance scale: cross-entropy from other_slots minus from slots."""
        tokens = torch.cat([v.flatten(1, 2) for v in guidance["vectors"]], 1)  # (n, L, c)
        indices = [i.flatten(1, 2) for i in guidance["indices"]]  # per scale (n, L_i, G)
        if other_slots is None:
            loss = self.loss(self(tokens, self.memory_of(slots)), indices, self.vocabularies)
            return loss, {"loss": loss.detach()}, None
        own, other = (self.token_losses(self(tokens, self.memory_of(s)), indices, self.vocabularies)
                      for s in (slots, other_slots))
        loss = own.mean()
        return loss, {"loss": loss.detach(), "loss_shuffled_slots": other.mean().detach(),
                      "token_slot_gain": (other - own)[:, :self.lengths[0]].detach()}, None


class SlotPredictor(nn.Module):
    """STEVE's predictor: a transformer encoder layer over the slots of frame t-1 gives the queries of frame t."""

    def __init__(self, dim: int, heads: int, layers: int = 1):
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.net = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        return self.net(slots)


class MixtureLoss:
    """The mixture decoder family (DINOSAUR, mixture): each slot decoded alone to a feature map and an alpha map,
    the alphas (softmax over slots) mix the maps and are the masks; the loss is the mean squared error to the target
    the decoder `reads` (DINO features, the VAE's guidance vectors, or pixels), set by the model that builds it."""

    reads = "features"

    def decode_loss(self, target: torch.Tensor, slots: torch.Tensor, other_slots: torch.Tensor = None) -> tuple:
        """target (b,D,h,w), slots (b,s,d) -> (loss, stats, masks (b,s,h,w)); with `other_slots`, stats add the
        loss from them."""
        flat_target = target.flatten(2).transpose(1, 2).float()  # (b, P, D)
        reconstruction, alpha = self(slots)
        loss = F.mse_loss(reconstruction.float(), flat_target)
        stats = {"loss": loss.detach()}
        if other_slots is not None:
            stats["loss_shuffled_slots"] = F.mse_loss(self(other_slots)[0].float(), flat_target).detach()
        return loss, stats, alpha.view(*alpha.shape[:2], *target.shape[-2:])


class BroadcastMLPDecoder(MixtureLoss, nn.Module):
    """DINOSAUR's decoder: each slot broadcast to every patch position (+ learned position), an MLP gives a
    feature and an alpha logit; alphas softmax over slots mix the features (and are the masks)."""

    def __init__(self, slot_dim: int, feature_dim: int, positions: int, hidden: int, layers: int = 3):
        super().__init__()
        self.position = nn.Parameter(torch.randn(1, 1, positions, slot_dim) * 0.02)
        blocks, width = [], slot_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.mlp = nn.Sequential(*blocks, nn.Linear(width, feature_dim + 1))

    def forward(self, slots: torch.Tensor) -> tuple:
        """(b,s,d) -> reconstruction (b, P, D), masks (b, s, P)."""
        out = self.mlp(slots[:, :, None] + self.position)  # (b,s,P,D+1)
        features, alpha_logits = out[..., :-1], out[..., -1]
        masks = alpha_logits.softmax(1)
        return (masks[..., None] * features).sum(1), masks


def position_grid(h: int, w: int, device=None) -> torch.Tensor:
    """(h, w, 4): each cell's (x, y, 1-x, 1-y) in [0, 1] (Locatello et al. 2020's position features)."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h, device=device), torch.linspace(0, 1, w, device=device),
                            indexing="ij")
    return torch.stack([xs, ys, 1 - xs, 1 - ys], -1)


class BroadcastCNNDecoder(MixtureLoss, nn.Module):
    """The spatial broadcast decoder of Slot Attention (Locatello et al. 2020): each slot tiled on a small grid plus
    a linear map of the grid positions, transposed convolutions (stride 2) up to the target grid, then a 3x3
    convolution to a feature and an alpha logit per cell; alphas softmax over slots mix the features (the masks).
    Four convolutions in all; the broadcast grid is max(4, side / 8)."""

    def __init__(self, slot_dim: int, feature_dim: int, side: int, hidden: int):
        super().__init__()
        start = side if side < 4 else max(4, side // 8)
        upsamples = round(math.log2(side / start))
        if start * 2 ** upsamples != side:
            raise UserError(f"the CNN mixture decoder needs a target grid side of 4 * 2^k, got {side}")
        self.start, self.side = start, side
        self.position = nn.Linear(4, slot_dim)
        layers, width = [], slot_dim
        for i in range(3):
            if i < upsamples:
                layers += [nn.ConvTranspose2d(width, hidden, 5, 2, 2, output_padding=1), nn.ReLU(inplace=True)]
            else:
                layers += [nn.Conv2d(width, hidden, 5, 1, 2), nn.ReLU(inplace=True)]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Conv2d(width, feature_dim + 1, 3, 1, 1))

    def forward(self, slots: torch.Tensor) -> tuple:
        """(b,s,d) -> reconstruction (b, P, D), masks (b, s, P), P = side^2 row-major."""
        b, s, d = slots.shape
        position = self.position(position_grid(self.start, self.start, slots.device).to(slots.dtype))
        tiled = slots.reshape(b * s, 1, 1, d) + position[None]  # (b*s, h, w, d)
        out = self.net(tiled.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2).view(b, s, self.side ** 2, -1)
        features, alpha_logits = out[..., :-1], out[..., -1]
        masks = alpha_logits.softmax(1)
        return (masks[..., None] * features).sum(1), masks


# ================================================================================================================
# SlotDiffusion: the DDPM noise schedule and samplers, the slot-conditioned UNet denoiser, the loss.
#
# The schedule follows diffusers' DDPMScheduler / DDIMScheduler (the tests use them as the oracle): betas in
# float32, abar_t = prod_{s<=t} (1 - beta_s), epsilon prediction, no sample clipping (the latent is not in [-1, 1]).

class DDPMSchedule(nn.Module):
    """The forward process q(x_t | x_0) of a `steps`-step DDPM and two reverse updates: DDIM (eta = 0,
    deterministic, any subset of timesteps) and DDPM's ancestral step (every timestep, "fixed_small" variance).

    Buffers are float32 and non-persistent: they are a pure function of (steps, schedule, start, end), so checkpoints
    do not carry them and `.to(device)` moves them."""

    def __init__(self, steps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02):
        super().__init__()
        # Named as in diffusers: "linear" is linear in beta; "scaled_linear" is linear in sqrt(beta), which is what
        # the LDM / SlotDiffusion code calls "linear" (SlotDiffusion and the MSF release: 0.0015 .. 0.0195).
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start} and {beta_end}")
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}: use 'linear' or 'scaled_linear'.")
        self.steps = steps
        self.register_buffer("betas", betas, persistent=False)  # (steps,)
        self.register_buffer("alphas", 1.0 - betas, persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, 0), persistent=False)

    def alpha_bar(self, t: int) -> torch.Tensor:
        """abar_t as a 0-d tensor; abar_{t<0} = 1 (diffusers' `set_alpha_to_one=True`: the last step lands on x0)."""
        if t < 0:
            return torch.ones((), device=self.alphas_cumprod.device)
        return self.alphas_cumprod[t]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q_sample: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise for per-sample timesteps t (b,) (LongTensor)."""
        alpha_bar = self.alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))  # (b, 1, ...)
        return alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise

    def timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """Descending sampling timesteps, diffusers' "leading" spacing: (n-1)k, ..., k, 0 with k = steps // n."""
        if not 1 <= num_inference_steps <= self.steps:
            raise ValueError(f"num_inference_steps must be in [1, {self.steps}], got {num_inference_steps}.")
        stride = self.steps // num_inference_steps
        return torch.arange(num_inference_steps - 1, -1, -1, dtype=torch.long) * stride  # (n,)

    def step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor, prev_t: int) -> torch.Tensor:
        """DDIM update with eta = 0 from timestep t to prev_t < t (prev_t < 0: the final step, returns the x0
        estimate). eps is the predicted noise; t and prev_t are ints shared by the whole batch."""
        alpha_bar, alpha_bar_prev = self.alpha_bar(t), self.alpha_bar(prev_t)
        x0 = (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5  # DDIM Eq. 12, "predicted x0"
        return alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev) ** 0.5 * eps

    def ddpm_variance(self, t: int) -> torch.Tensor:
        """Posterior variance of q(x_{t-1} | x_t, x0), "fixed_small": beta_t (1 - abar_{t-1}) / (1 - abar_t)."""
        alpha_bar, alpha_bar_prev = self.alpha_bar(t), self.alpha_bar(t - 1)
        beta = 1 - alpha_bar / alpha_bar_prev
        return torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)

    def ddpm_step(self, eps: torch.Tensor, t: int, x_t: torch.Tensor, generator=None) -> torch.Tensor:
        """DDPM ancestral update t -> t-1 (Ho et al. Eq. 7 posterior mean + sqrt(variance) z). Noise is drawn only
        for t > 0, as torch.randn on the generator's device, so a seeded generator reproduces diffusers' step."""
        alpha_bar, alpha_bar_prev = self.alpha_bar(t), self.alpha_bar(t - 1)
        alpha, beta = alpha_bar / alpha_bar_prev, 1 - alpha_bar / alpha_bar_prev
        x0 = (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5
        mean = (alpha_bar_prev ** 0.5 * beta / (1 - alpha_bar)) * x0 + (alpha ** 0.5 * (1 - alpha_bar_prev) /
                                                                      (1 - alpha_bar)) * x_t
        if t == 0:
            return mean
        device = generator.device if generator is not None else x_t.device
        z = torch.randn(x_t.shape, generator=generator, device=device, dtype=x_t.dtype).to(x_t.device)
        return mean + self.ddpm_variance(t) ** 0.5 * z


def unet_group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest power-of-two group count <= 32 that divides `channels`."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids of the integer timesteps (b,) -> (b, dim): [cos | sin] over geometric frequencies."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * frequencies[None]  # (b, half)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], 1)
    return F.pad(embedding, (0, dim % 2))


class UNetResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between (LDM's ResBlock without dropout)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int):
        super().__init__()
        self.norm1, self.conv1 = unet_group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.norm2, self.conv2 = unet_group_norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """x (b, c_in, h, w), time (b, time_dim) -> (b, c_out, h, w)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(time))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNetAttention(nn.Module):
    """Multi-head attention of queries (b, n, dim) over a context (b, m, context_dim) (self-attention: the
    queries themselves)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"UNet width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)  # (b, heads, n, d/heads)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, d/heads)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class SpatialTransformer(nn.Module):
    """LDM's spatial transformer: the feature map as h*w tokens through one pre-LayerNorm block of self-attention,
    cross-attention to the slots (the only place the slots enter the denoiser) and a GELU feed-forward."""

    def __init__(self, channels: int, slot_dim: int, heads: int):
        super().__init__()
        self.norm = unet_group_norm(channels)
        self.proj_in = nn.Linear(channels, channels)
        self.norm1, self.self_attention = nn.LayerNorm(channels), UNetAttention(channels, channels, heads)
        self.norm2, self.cross_attention = nn.LayerNorm(channels), UNetAttention(channels, slot_dim, heads)
        self.norm3 = nn.LayerNorm(channels)
        self.feed_forward = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(),
                                          nn.Linear(4 * channels, channels))
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x (b, c, h, w), slots (b, s, slot_dim) -> (b, c, h, w)."""
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (b, h*w, c)
        normed = self.norm1(tokens)
        tokens = tokens + self.self_attention(normed, normed)
        tokens = tokens + self.cross_attention(self.norm2(tokens), slots)
        tokens = tokens + self.feed_forward(self.norm3(tokens))
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class SlotUNet(nn.Module):
    """SlotDiffusion's denoiser eps(x_t, t, slots): an LDM-style UNet on the VAE latent (b, c, h, w), h and w
    divisible by 4. Widths channels * CHANNEL_MULT with RES_BLOCKS ResBlocks per level and a stride-2 conv
    between levels (32 -> 16 -> 8); a SpatialTransformer after every ResBlock of the ATTENTION_LEVELS and in
    the middle block; the up path mirrors it with RES_BLOCKS + 1 ResBlocks per level, each fed one skip."""

    CHANNEL_MULT = (1, 2, 4)
    RES_BLOCKS = 2
    ATTENTION_LEVELS = (1, 2)  # the two downsampled resolutions, e.g. 16x16 and 8x8 of a 32x32 latent

    def __init__(self, in_channels: int, channels: int, slot_dim: int, heads: int = 4):
        super().__init__()
        self.channels = channels
        time_dim = 4 * channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels * m for m in self.CHANNEL_MULT]
        last = len(widths) - 1

        self.down = nn.ModuleList()
        skip_widths, width = [channels], channels
        for level, out_width in enumerate(widths):
            for _ in range(self.RES_BLOCKS):
                layers = [UNetResBlock(width, out_width, time_dim)]
                if level in self.ATTENTION_LEVELS:
                    layers.append(SpatialTransformer(out_width, slot_dim, heads))
                self.down.append(nn.ModuleList(layers))
                width = out_width
                skip_widths.append(width)
            if level != last:
                self.down.append(nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1)]))
                skip_widths.append(width)

        self.middle = nn.ModuleList([UNetResBlock(width, width, time_dim), SpatialTransformer(width, slot_dim, heads),
                                     UNetResBlock(width, width, time_dim)])

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for block in range(self.RES_BLOCKS + 1):
                layers = [UNetResBlock(width + skip_widths.pop(), widths[level], time_dim)]
                width = widths[level]
                if level in self.ATTENTION_LEVELS:
                    layers.append(SpatialTransformer(width, slot_dim, heads))
                if level != 0 and block == self.RES_BLOCKS:
                    layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(width, width, 3, padding=1)]
                self.up.append(nn.ModuleList(layers))

        self.norm_out = unet_group_norm(width)
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)
        # Zero-initialised like LDM's output layer: the untrained denoiser predicts eps = 0 (loss 1 at start).
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @staticmethod
    def run(layers: nn.ModuleList, x: torch.Tensor, time: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Apply one block's layers, giving each its conditioning (ResBlock: time, SpatialTransformer: slots)."""
        for layer in layers:
            if isinstance(layer, UNetResBlock):
                x = layer(x, time)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, slots)
            else:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor, t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x (b, c, h, w) noisy latent, t (b,) integer timesteps, slots (b, s, slot_dim) -> eps (b, c, h, w)."""
        factor = 2 ** (len(self.CHANNEL_MULT) - 1)
        assert x.shape[-2] % factor == 0 and x.shape[-1] % factor == 0, \
            f"SlotUNet needs a latent side divisible by {factor}, got {tuple(x.shape[-2:])}"
        time = self.time_mlp(timestep_embedding(t, self.channels))  # (b, 4*channels)
        h = self.conv_in(x)
        skips = [h]
        for layers in self.down:
            h = self.run(layers, h, time, slots)
            skips.append(h)
        h = self.run(self.middle, h, time, slots)
        for layers in self.up:
            h = self.run(layers, torch.cat([h, skips.pop()], 1), time, slots)
        return self.conv_out(F.silu(self.norm_out(h)))


def diffusion_loss(unet: nn.Module, schedule: DDPMSchedule, x0: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """DDPM's simple loss (Ho et al. Eq. 14): t ~ U{0, ..., steps-1}, eps ~ N(0, I), MSE between the denoiser's
    prediction for x_t = q_sample(x0, eps, t) and eps, in float32. x0 (b, c, h, w), slots (b, s, d)."""
    x0 = x0.float()
    t = torch.randint(0, schedule.steps, (x0.shape[0],), device=x0.device)  # (b,)
    noise = torch.randn_like(x0)
    predicted = unet(schedule.add_noise(x0, noise, t), t, slots)
    return F.mse_loss(predicted.float(), noise)


@torch.no_grad()
def sample(unet: nn.Module, schedule: DDPMSchedule, slots: torch.Tensor, shape: tuple,
           num_inference_steps: int = 50, generator=None) -> torch.Tensor:
    """DDIM sampling (eta = 0, always, also when num_inference_steps equals the training steps) of a latent of
    `shape` given slots (b, s, d): x_T ~ N(0, I) drawn from `generator` (on the generator's device), then the
    deterministic update over `schedule.timesteps(num_inference_steps)`. The last step lands on abar = 1, so the
    result is the x0 estimate. The schedule runs in float32; the result has the slots' device and dtype."""
    device = slots.device
    noise_device = generator.device if generator is not None else device
    x = torch.randn(shape, generator=generator, device=noise_device, dtype=torch.float32).to(device)
    timesteps = schedule.timesteps(num_inference_steps).tolist()
    for i, t in enumerate(timesteps):
        prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = unet(x, torch.full((shape[0],), t, device=device, dtype=torch.long), slots).float()
        x = schedule.step(eps, t, x, prev_t)
    return x.to(slots.dtype)


class EMA(nn.Module):
    """An exponential moving average of a module's parameters, kept as a frozen copy (`module`), as SlotDiffusion
    keeps one of its denoiser (LDM's LitEma): update n (1, 2, ...) sets shadow <- d shadow + (1 - d) live with
    d = min(decay, (1 + n) / (10 + n)), so early updates follow the live weights closely. The copy and the update
    count are in the state dict: checkpoints carry them and resume continues them exactly."""

    def __init__(self, module: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True):
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        self.updates += 1
        n = int(self.updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for shadow, parameter in zip(self.module.parameters(), live.parameters()):
            shadow.lerp_(parameter.detach(), 1 - decay)
        for shadow, buffer in zip(self.module.buffers(), live.buffers()):
            shadow.copy_(buffer)


class DiffusionDecoder(nn.Module):
    """The diffusion decoder family (SlotDiffusion): a slot-conditioned UNet denoising the VAE latent under a DDPM
    schedule, the latent divided by its measured std (LDM's scale factor), optionally an EMA of the UNet that
    samples reconstructions. It reads the latent; the masks are Slot Attention's; its loss draws noise, so it gives
    no shuffled-slot comparison."""

    reads = "latent"

    def __init__(self, code_dim: int, slot_dim: int, config: dict):
        super().__init__()
        if not 0 <= config["denoiser_ema"] < 1:
            raise UserError(f"denoiser_ema must be in [0, 1) (0 = off), got {config['denoiser_ema']}")
        self.target = config["diffusion_target"]
        self.schedule = DDPMSchedule(config["diffusion_steps"], config["beta_schedule"], config["beta_start"],
                                     config["beta_end"])
        self.unet = SlotUNet(code_dim, config["unet_channels"], slot_dim=slot_dim, heads=config["decoder_heads"])
        self.ema = EMA(self.unet, config["denoiser_ema"]) if config["denoiser_ema"] else None
        self.register_buffer("latent_scale", torch.tensor(float(config["latent_scale"] or 1.0)))

    def decode_loss(self, latent: torch.Tensor, slots: torch.Tensor, other_slots: torch.Tensor = None) -> tuple:
        loss = diffusion_loss(self.unet, self.schedule, latent / self.latent_scale, slots)
        return loss, {"loss": loss.detach()}, None

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update(self.unet)

    @torch.no_grad()
    def sample(self, slots: torch.Tensor, shape: tuple, steps: int) -> torch.Tensor:
        """A latent of `shape` sampled from the slots with the sampling denoiser (the EMA one when configured),
        in the VAE's units."""
        denoiser = self.ema.module if self.ema is not None else self.unet
        return sample(denoiser, self.schedule, slots, shape, num_inference_steps=steps) * self.latent_scale


# Checkpoints written before the decoders became one object per family name some entries differently: the one
# rule that reads them (OCLModel registers it as a load_state_dict pre-hook).
OLD_KEY_PREFIXES = {"slotdiffusion": (("decoder_ema.", "decoder.ema."), ("schedule.", "decoder.schedule."),
                                      ("latent_scale", "decoder.latent_scale"), ("decoder.", "decoder.unet.")),
                    "sysbinder": (("block_embedding", "decoder.block_embedding"),)}


# ================================================================================================================
# The OCL model: one class, the method picks the decoder.

class OCLModel(nn.Module):
    """Encoder -> Slot Attention -> the method's decoder, guided by a frozen VAE (kept in eval mode, no gradients).
    The decoder is chosen once (`build_decoder`); it says what it reads (`reads`) and returns its loss, its stats
    and, for mixture decoders, the masks (`decode_loss`).

    forward(batch, sigma) returns (loss, stats, masks) with masks (b, [T,] s, h, w), the soft slot masks on the
    feature grid (Slot Attention's attention maps, or a mixture decoder's alphas)."""

    def __init__(self, config: dict, vae=None, video: bool = False):
        super().__init__()
        self.config = dict(config)
        self.method, self.video = config["method"], video
        self.scales = list(config["guidance_scales"])
        dim = config["slot_dim"]
        self.encoder = FeatureEncoder(config)
        if self.method == "sysbinder":
            self.slot_attention = BlockSlotAttention(dim, config["sa_iterations"], config["sysbinder_blocks"],
                                                     config["sysbinder_prototypes"], config["sa_truncation"])
        else:
            self.slot_attention = SlotAttention(dim, config["sa_iterations"], config["sa_mlp_dim"],
                                                truncation=config["sa_truncation"])
        if video:
            self.predictor = SlotPredictor(dim, config["decoder_heads"], config["predictor_layers"])
        if video and config["video_queries"] == "boxes":
            self.queries = BoxQueries(dim)
        else:
            self.queries = GaussianQueries(config["num_slots"], dim)
        self.vae = vae
        if vae is not None:
            vae.requires_grad_(False).eval()
        if self.method != "slotdiffusion" and config["denoiser_ema"]:
            raise UserError(f"denoiser_ema is SlotDiffusion's; method {self.method} has no denoiser, set it to 0")
        self.decoder = DECODERS[self.method](self)
        self._register_load_state_dict_pre_hook(self._rename_old_keys)

    def _rename_old_keys(self, state_dict, prefix, *args) -> None:
        """Read a checkpoint written before the decoders were one object per family (OLD_KEY_PREFIXES)."""
        renames = OLD_KEY_PREFIXES.get(self.method, ())
        marker = prefix + renames[0][0] if renames else None
        if not renames or not any(k.startswith(marker) for k in state_dict):
            return
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "vae.")]:
            for old, new in renames:
                if key.startswith(prefix + old):
                    state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
                    break

    @property
    def decoder_ema(self):
        """SlotDiffusion's sampling denoiser when `denoiser_ema` is set, else None."""
        return getattr(self.decoder, "ema", None)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()  # frozen guidance: argmax matching, no Gumbel
        return self

    def update_ema(self) -> None:
        """After each optimiser step: advance the EMA of the SlotDiffusion denoiser, if configured."""
        if isinstance(self.decoder, DiffusionDecoder):
            self.decoder.update_ema()

    # --------------------------------------------------------------------------------------------- slots
    def slots(self, images: torch.Tensor, sigma: float, boxes: torch.Tensor = None, dino_features=None) -> tuple:
        """Images (b,3,H,W) -> slots (b,s,d), masks (b,s,h,w). Videos (b,T,3,H,W) with first-frame boxes
        (b,K,4) -> slots (b,T,s,d), masks (b,T,s,h,w): frame 0 from the boxes (or, with `video_queries: gaussian`,
        from the Gaussian queries as for images) with every SA iteration, frame t from the predictor applied to
        frame t-1 with one iteration (STEVE)."""
        if not self.video:
            inputs, (h, w) = self.encoder(images, dino_features)
            slots, attention = self.slot_attention(inputs, self.queries(images.shape[0], sigma))
            return slots, attention.view(*attention.shape[:2], h, w)
        b, t = images.shape[:2]
        inputs, (h, w) = self.encoder(images.flatten(0, 1))
        inputs = inputs.view(b, t, *inputs.shape[1:])
        if isinstance(self.queries, BoxQueries):
            queries = self.queries(boxes_for_slots(boxes, self.config["num_slots"]))
        else:  # video_queries: gaussian, as for images
            queries = self.queries(b, sigma)
        slots, attention = self.slot_attention(inputs[:, 0], queries)
        all_slots, all_attention = [slots], [attention]
        for frame in range(1, t):
            slots, attention = self.slot_attention(inputs[:, frame], self.predictor(slots), iterations=1)
            all_slots.append(slots), all_attention.append(attention)
        slots, attention = torch.stack(all_slots, 1), torch.stack(all_attention, 1)
        return slots, attention.view(*attention.shape[:3], h, w)

    def slots_and_masks(self, images: torch.Tensor, sigma: float = 0.0, boxes: torch.Tensor = None) -> tuple:
        """Slots and the masks the model segments with, on the feature grid: Slot Attention's attention, or a
        mixture decoder's alphas (which are what it reconstructs with)."""
        if self.video or not isinstance(self.decoder, MixtureLoss):
            return self.slots(images, sigma, boxes=boxes)
        features = self.encoder.backbone.dino_features(images) if self.decoder.reads == "features" else None
        slots, _ = self.slots(images, sigma, dino_features=features)
        _, alpha = self.decoder(slots)
        side = math.isqrt(alpha.shape[-1])
        return slots, alpha.view(*alpha.shape[:2], side, side)

    # --------------------------------------------------------------------------------------------- targets
    def guidance(self, frames: torch.Tensor) -> dict:
        """The frozen VAE's guidance of (n,3,H,W) frames for the configured scales (float32, no gradients);
        sampled with `guidance_noise` while training, argmax otherwise."""
        temperature = self.config["guidance_noise"] if self.training else 0.0
        with torch.no_grad(), torch.autocast(frames.device.type, enabled=False):
            return self.vae.guidance(frames.float(), self.scales, temperature)

    def diffusion_latent(self, frames: torch.Tensor) -> torch.Tensor:
        """SlotDiffusion's x0 for (n,3,H,W) frames, (n,c,h,w) float32 before the latent scale: the VAE encoder's
        continuous scale-1 output Z_1 before any quantisation (`continuous`: SlotDiffusion's VQVAE.encode, the MSF
        release's eaq=True; for MSF with concat_pinv it is Z_1 before the project-up split), or the quantised
        guidance X_1 (`quantized`)."""
        if self.decoder.target == "quantized":
            return self.guidance(frames)["vectors"][0].permute(0, 3, 1, 2).float()
        with torch.no_grad(), torch.autocast(frames.device.type, enabled=False):
            _, continuous = self.vae.encode(frames.float())
        return continuous[0].permute(0, 3, 1, 2).float()

    def target(self, frames: torch.Tensor, dino_features: torch.Tensor = None):
        """What the decoder reconstructs from the slots of (n,3,H,W) frames (its `reads`): the guidance dict, the
        diffusion latent, DINO features or the VAE's guidance vectors (n,D,h,w), or the frames themselves."""
        reads = self.decoder.reads
        if reads == "guidance":
            return self.guidance(frames)
        if reads == "latent":
            return self.diffusion_latent(frames)
        if reads == "guidance_vectors":
            return self.guidance(frames)["vectors"][0].permute(0, 3, 1, 2)
        if reads == "pixels":
            return frames
        return dino_features

    def target_is_cacheable(self) -> bool:
        """Whether `target` of a training image is a pure function of that image, so it can be computed once and
        kept: what the frozen VAE gives (eval mode, no data augmentation in this repository) with argmax matching
        (no guidance noise): the guidance vectors of the mixture decoder, the guidance tokens of SLATE's decoder
        (SLATE, OGDR, SysBinder), SlotDiffusion's latent; not a video clip (its frames are drawn anew)."""
        return (self.decoder.reads in ("guidance_vectors", "guidance", "latent") and not self.video
                and self.config["guidance_noise"] == 0)

    def decode_loss(self, frames: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss of (n,3,H,W) frames from their slots (n,s,d)."""
        return self.decoder.decode_loss(self.target(frames), slots)[0]

    def forward(self, batch: dict, sigma: float = 0.0, shuffled_slots: bool = False, target=None) -> tuple:
        """Training / validation pass: (loss, stats, masks). `target`: what the decoder reconstructs of these
        images when the caller has it already (`self.target` of them, e.g. kept from an earlier epoch when
        `target_is_cacheable`). `shuffled_slots` adds stats["loss_shuffled_slots"]: the
        same loss with every image's slots swapped for the next image's (the batch rolled by one), so its gap to
        the loss shows how much the decoder relies on the slots rather than on its autoregressive context or its
        prior; decoders whose loss draws noise (diffusion) leave it out. Token decoders also give
        stats["token_slot_gain"] (b·T, L_1): that gap per token of the first guidance scale, row-major on its token
        grid, frames of a video one after the other."""
        dino_features = None
        if self.video:  # every frame of a video decoded from its own slots; shuffled: another video's, frame by frame
            video = batch["video"]
            slots, masks = self.slots(video, sigma, boxes=batch["bbox"][:, 0])
            frames, other = video.flatten(0, 1), slots.roll(1, 0).flatten(0, 1)
            slots = slots.flatten(0, 1)
        else:
            frames = batch["image"]
            if self.decoder.reads == "features":  # DINOSAUR: DINO's features are the input and the target
                dino_features = self.encoder.backbone.dino_features(frames)  # (b,D,h,w)
            slots, masks = self.slots(frames, sigma, dino_features=dino_features)
            other = slots.roll(1, 0)
        shuffle = shuffled_slots and not isinstance(self.decoder, DiffusionDecoder) and frames.shape[0] > 1
        if target is None:
            target = self.target(frames, dino_features)
        loss, stats, decoder_masks = self.decoder.decode_loss(target, slots,
                                                              other if shuffle else None)
        return loss, stats, masks if decoder_masks is None else decoder_masks

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, slots: torch.Tensor, steps: int = 50) -> torch.Tensor:
        """SlotDiffusion: sample the latent from the slots and decode it with the VAE -> (b,3,H,W) in [-1,1]. The
        sample, continuous or an estimate of the quantised guidance, goes to the VAE decoder as it is (no
        re-quantisation: MSF's quantiser needs every pyramid scale, a sampled scale-1 latent has only one). The
        denoiser is the EMA one when `denoiser_ema` is set."""
        shape = (images.shape[0], self.vae.config["code_dim"], images.shape[-2] // 4, images.shape[-1] // 4)
        latent = self.decoder.sample(slots, shape, steps)
        return self.vae.decode(latent.permute(0, 2, 3, 1)).clamp(-1, 1)


# ================================================================================================================
# The decoder of each method, built once from the model it joins (DiT-style registry: name -> constructor).

def token_decoder(model: OCLModel) -> TokenDecoder:
    config, vae = model.config, model.vae
    side = config["resolution"] // 4  # VAE tokens per side at scale 1
    lengths = [(side // 2 ** (s - 1)) ** 2 for s in model.scales]
    blocks = config["sysbinder_blocks"] if config["method"] == "sysbinder" else 0
    return TokenDecoder(vae.config["code_dim"], config["slot_dim"], config, lengths,
                        vae_vocabularies(vae, model.scales), blocks)


def diffusion_decoder(model: OCLModel) -> DiffusionDecoder:
    return DiffusionDecoder(model.vae.config["code_dim"], model.config["slot_dim"], model.config)


def dinosaur_decoder(model: OCLModel) -> BroadcastMLPDecoder:
    config, backbone = model.config, model.encoder.backbone
    patches = (config["resolution"] // backbone.patch) ** 2
    return BroadcastMLPDecoder(config["slot_dim"], backbone.dino.num_features, patches, config["dinosaur_hidden"])


def mixture_decoder(model: OCLModel) -> MixtureLoss:
    """The broadcast mixture decoder over the VAE's guidance vectors at one scale (VQ-VFM-OCL's VVO-Mlp with
    `mixture_decoder: mlp`), or over the pixels (`mixture_target: pixels`, a diagnostic without guidance)."""
    config = model.config
    if config["mixture_target"] == "pixels":
        side, target_dim, reads = config["resolution"], 3, "pixels"
    else:
        if len(model.scales) != 1:
            raise UserError(f"the mixture decoder reconstructs one guidance scale; guidance_scales is {model.scales}")
        side = config["resolution"] // 4 // 2 ** (model.scales[0] - 1)
        target_dim, reads = model.vae.config["code_dim"], "guidance_vectors"
    if config["mixture_decoder"] == "mlp":
        decoder = BroadcastMLPDecoder(config["slot_dim"], target_dim, side * side, config["mixture_hidden"])
    else:
        decoder = BroadcastCNNDecoder(config["slot_dim"], target_dim, side, config["mixture_hidden"])
    decoder.reads = reads
    return decoder


DECODERS = {"slate": token_decoder, "steve": token_decoder, "sysbinder": token_decoder, "ogdr": token_decoder,
            "slotdiffusion": diffusion_decoder, "dinosaur": dinosaur_decoder, "mixture": mixture_decoder}


def vae_vocabularies(vae, scales: list) -> list:
    """Group sizes of the VAE's code indices at each guidance scale (e.g. [[64, 64]] for MSF scale 1)."""
    probe = torch.zeros(1, 3, 4 * 2 ** (vae.num_scales - 1), 4 * 2 ** (vae.num_scales - 1),
                        device=next(vae.parameters()).device)
    return vae.guidance(probe, scales)["group_sizes"]


def masks_to_segments(masks: torch.Tensor, size: tuple) -> torch.Tensor:
    """Soft slot masks (b, [T,] s, h, w) -> predicted segment ids (b, [T,] H, W): bilinear upsampling to the image
    size, then argmax over slots (README, "Evaluation protocol")."""
    lead = masks.shape[:-3]
    flat = masks.reshape(-1, *masks.shape[-3:]).float()
    upsampled = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return upsampled.argmax(1).view(*lead, *size)


def query_sigma(step: int, total_steps: int, config: dict) -> float:
    """The shared sigma of the Gaussian slot queries: cosine start -> 0 over `query_sigma_anneal_fraction` of
    training (the paper: all of it), then 0 as in evaluation; 0 for single-object data."""
    if config["single_object"]:
        return 0.0
    anneal = int(round(total_steps * config["query_sigma_anneal_fraction"]))
    return cosine_anneal(step, anneal, config["query_sigma_start"], 0.0)


# ================================================================================================================
# Building a model from a config.

def build_model(config: dict, video: bool, vae=None) -> OCLModel:
    """The OCL model a config describes, after checking that its method fits the data and the guidance VAE
    (train_ocl.py builds it for training, evaluate.py from a checkpoint's own config)."""
    if config["method"] == "steve" and not video:
        raise UserError("STEVE is a video method; point data_dir at a video dataset (e.g. data/shapes_video)")
    if config["method"] in ("slate", "dinosaur", "mixture") and video:
        raise UserError(f"{config['method']} is an image method; its video counterpart is steve")
    for scale in config["guidance_scales"]:
        if vae is not None and not 1 <= scale <= vae.num_scales:
            raise UserError(f"guidance_scales {config['guidance_scales']} asks for scale {scale} of a VAE with "
                            f"{vae.num_scales} scale(s)")
    if config["method"] == "slotdiffusion" and config["guidance_scales"] != [1]:
        raise UserError("SlotDiffusion diffuses one latent: guidance_scales must be [1]")
    return OCLModel(config, vae, video)


# ================================================================================================================
# Config keys of the OCL model (train_ocl.py adds the training keys; checkpoints store all of them).

OCL_OPTIONS = {
    "method": option("slate", "OCL method", choices=("slate", "steve", "slotdiffusion", "dinosaur", "sysbinder", "ogdr",
                                                     "mixture")),
    "guidance": option("msf", "guidance kind; must match the VAE checkpoint's quantizer (none for DINOSAUR)",
                       choices=("vq", "grouped", "msf", "none")),
    "vae_ckpt": option("", "VAE checkpoint (file or run directory) that guides the decoder"),
    "guidance_scales": option([1], "VAE scales that guide the decoder: [1], [1, 2] or [2] (paper Table 5)",
                              type="int_list", min=1, max=4),
    "encoder": option("dino_biglittle", "primary encoder: DINO big-little (paper) or the naive CNN (ablations)",
                      choices=("dino_biglittle", "cnn")),
    "dino_model": option("vit_small_patch8_224.dino", "timm name of the frozen DINO ViT"),
    "dino_pretrained": option(True, "load DINO weights from the timm hub (needs internet)"),
    "dino_weights": option("", "local DINO state dict (timm or official format); overrides dino_pretrained"),
    "dino_depth": option(0, "ViT depth override (0 = the model's own; tests use 1)", min=0),
    "cnn_channels": option(64, "channels of the naive CNN branch", min=1),
    "encoder_stride": option(1, "feature-map downsampling before Slot Attention (1 = full resolution, paper)",
                             choices=(1, 2, 4, 8)),
    "num_slots": option(11, "slots (max objects + 1)", min=1),
    "slot_dim": option(256, "slot and feature dimension", min=1),
    "sa_iterations": option(3, "Slot Attention iterations (videos: on the first frame; later frames use 1)", min=1),
    "sa_mlp_dim": option(0, "hidden size of the slot MLP (0 = 2 x slot_dim)", min=0),
    "sa_truncation": option("none", "gradient through the Slot Attention iterations: all of them (paper), or bi-level "
                            "(BO-QSA, the MSF release: the last iteration only, straight through to the queries)",
                            choices=("none", "bi-level")),
    "video_queries": option("boxes", "videos: the first frame's slots start from its object boxes through an MLP "
                            "(conditional, as the paper's video runs), or from the Gaussian queries as for images "
                            "(STEVE's own paper; the boxes are then not used)", choices=("boxes", "gaussian")),
    "query_sigma_start": option(1.0, "initial sigma of the Gaussian slot queries (annealed to 0)", min=0.0),
    "query_sigma_anneal_fraction": option(1.0, "fraction of training over which sigma reaches 0 (paper: 1); below 1 "
                                               "the rest trains at sigma 0, as mid-run validations see",
                                          min=0.0, max=1.0),
    "single_object": option(False, "single-object data: sigma 0 throughout"),
    "decoder_dim": option(256, "transformer decoder width", min=1),
    "decoder_layers": option(4, "transformer decoder layers", min=1),
    "decoder_heads": option(4, "attention heads (decoder, predictor, UNet)", min=1),
    "decoder_dropout": option(0.1, "transformer decoder dropout", min=0.0, below=1.0),
    "guidance_noise": option(0.0, "Gumbel temperature of the frozen VAE's matching while training (0 = argmax); "
                                  "the release uses 0.2 (its std 5) with matching: official", min=0.0),
    "slate_loss": option("combined", "SLATE targets: one cross-entropy over the combined index, or one per group "
                         "summed (official code)", choices=("combined", "grouped")),
    "predictor_layers": option(1, "STEVE predictor transformer layers", min=1),
    "sysbinder_blocks": option(4, "SysBinder blocks per slot", min=1),
    "sysbinder_prototypes": option(64, "SysBinder prototypes per block", min=1),
    "unet_channels": option(64, "SlotDiffusion UNet base channels", min=1),
    "diffusion_steps": option(1000, "DDPM steps", min=1),
    "beta_schedule": option("scaled_linear", "DDPM beta schedule, diffusers' names: linear in beta, or linear in "
                            "sqrt(beta) (SlotDiffusion's and the MSF release's)", choices=("linear", "scaled_linear")),
    "beta_start": option(0.0015, "DDPM beta at t = 0 (SlotDiffusion / MSF release; diffusers' default 1e-4)",
                         above=0.0, below=1.0),
    "beta_end": option(0.0195, "DDPM beta at the last step (SlotDiffusion / MSF release; diffusers' default 0.02)",
                       above=0.0, below=1.0),
    "diffusion_target": option("continuous", "SlotDiffusion's x0: the VAE's continuous scale-1 encoding before "
                               "quantisation (SlotDiffusion; the MSF release's eaq=True) or the quantised guidance X",
                               choices=("continuous", "quantized")),
    "latent_scale": option(0.0, "SlotDiffusion latent divisor (0 = the std of the training latents, measured)",
                           min=0.0),
    "denoiser_ema": option(0.0, "SlotDiffusion: EMA decay of the denoiser that samples the reconstructions (0 = off, "
                           "as in SlotDiffusion's and the MSF release's configs; LDM's LitEma default 0.9999)",
                           min=0.0, below=1.0),
    "dinosaur_hidden": option(1024, "DINOSAUR MLP decoder width", min=1),
    "mixture_decoder": option("mlp", "mixture method's decoder: DINOSAUR's broadcast MLP (VQ-VFM-OCL's VVO-Mlp) or "
                              "Slot Attention's spatial broadcast CNN", choices=("mlp", "cnn")),
    "mixture_target": option("guidance", "what the mixture method reconstructs: the frozen VAE's guidance vectors "
                             "(one scale) or the input pixels (a diagnostic; takes guidance: none)",
                             choices=("guidance", "pixels")),
    "mixture_hidden": option(256, "mixture decoder width (MLP hidden units, or CNN channels)", min=1),
}
