"""A ViT in torch, with HF ``ViTForImageClassification``'s parameter names, and the ViT family's block
options (vitdeploy.families sets them in ViTConfig: DeiT's distillation token, DINOv2's LayerScale,
SwiGLU, registers and interpolated positions, CLIP's pre-norm, QuickGELU and projection, SigLIP's
attention-pooling head, which timm's SigLIP classifier reads too). Names a family adds:
``distillation_token``, ``register_tokens``, ``layer_scale{1,2}.lambda1``, ``vit.pre_layernorm``,
``distillation_classifier``, ``visual_projection``, ``head.*`` (SigLIP's pooling head).

Two choices here are for the exported graph, not for torch:
- attention scales Q before Q·Kᵀ and is plain MatMul-Softmax-MatMul (the shape TensorRT fuses);
- the prefix tokens ([CLS], distillation, registers) are added by padding the patch sequence with
  zero rows and adding a constant (tokens + position) table, so no Shape/Expand/Concat chain is
  needed even when the batch axis is symbolic. The arithmetic is the same as HF's concat-then-add.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vitdeploy.config import ViTConfig
from vitdeploy.errors import ConfigError


class QuickGELU(nn.Module):
    """CLIP's ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()  # exact erf form; the tanh form drifts over many layers
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise ConfigError(f"unsupported hidden_act {name!r}")


class PatchEmbeddings(nn.Module):
    """Image -> patch tokens: a strided Conv2d, flattened and transposed to [B, N, hidden]."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.image_size = config.image_hw
        self.patch_size = config.patch_hw
        self.num_channels = config.num_channels
        self.num_patches = config.num_patches
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=self.patch_size,
                                    stride=self.patch_size, bias=config.patch_bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.num_channels:
            raise ConfigError(
                f"Expected pixel_values of shape [B, {self.num_channels}, H, W], got {tuple(pixel_values.shape)}."
            )
        height, width = pixel_values.shape[-2:]
        if (height, width) != self.image_size:
            raise ConfigError(
                f"Input image size ({height}*{width}) doesn't match model "
                f"({self.image_size[0]}*{self.image_size[1]})."
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    """Prefix tokens ([CLS], DeiT's distillation token, DINOv2's registers) before the patch tokens,
    learned position embeddings added (interpolated once where the trained grid differs), dropout."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        if config.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        if config.distillation_token:
            self.distillation_token = nn.Parameter(torch.zeros(1, 1, hidden))
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, hidden))
        self.patch_embeddings = PatchEmbeddings(config)
        self.grid = (config.image_hw[0] // config.patch_hw[0], config.image_hw[1] // config.patch_hw[1])
        self.trained_grid = config.position_grid or self.grid
        self.antialias = config.position_antialias
        self.num_tokens_with_position = int(config.class_token) + int(config.distillation_token)
        positions = self.num_tokens_with_position + self.trained_grid[0] * self.trained_grid[1]
        self.position_embeddings = nn.Parameter(torch.zeros(1, positions, hidden))
        self.num_prefix = config.num_prefix_tokens
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # the interpolated positions, for eval (see train()): a buffer, so .to() and .half() move it too
        self.register_buffer("_table", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.bake())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.from_patches(self.patch_embeddings(pixel_values))

    def interpolated_positions(self) -> torch.Tensor:
        """The position table at the input grid: the trained one, or (DINOv2) its patch part resized
        bicubically in float32 with align_corners=False (antialiased for DINOv2 with registers), as HF's
        ``interpolate_pos_encoding`` does."""
        if self.trained_grid == self.grid:
            return self.position_embeddings
        k = self.num_tokens_with_position
        table = self.position_embeddings
        (th, tw), hidden = self.trained_grid, table.shape[-1]
        patch = table[:, k:].reshape(1, th, tw, hidden).permute(0, 3, 1, 2)
        patch = F.interpolate(patch.to(torch.float32), size=self.grid, mode="bicubic", align_corners=False,
                              antialias=self.antialias)
        patch = patch.to(table.dtype).permute(0, 2, 3, 1).reshape(1, -1, hidden)
        return torch.cat([table[:, :k], patch], dim=1)

    def bake(self) -> None:
        """Compute the interpolated position table once (in eval), so the traced graph holds a constant
        and no Resize; a no-op where the grids match."""
        self._table = None
        if self.trained_grid != self.grid and self.position_embeddings.device.type != "meta":
            with torch.no_grad():
                self._table = self.interpolated_positions().detach().clone()

    def train(self, mode: bool = True) -> ViTEmbeddings:
        super().train(mode)
        if mode:
            self._table = None  # training moves the positions: interpolate them on each pass
        else:
            self.bake()
        return self

    def prefix_table(self) -> torch.Tensor:
        """[1, prefix + N, hidden]: the prefix tokens (with their positions) then the patch positions."""
        positions = self._table if (self._table is not None and not self.training) else self.interpolated_positions()
        k = self.num_tokens_with_position
        tokens = [t for t in (getattr(self, "cls_token", None), getattr(self, "distillation_token", None))
                  if t is not None]
        parts = [torch.cat(tokens, dim=1) + positions[:, :k]] if tokens else []
        if hasattr(self, "register_tokens"):
            parts.append(self.register_tokens)
        return torch.cat([*parts, positions[:, k:]], dim=1) if parts else positions

    def from_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, hidden] (the patch embedding's output) -> the embeddings [B, prefix + N, hidden]."""
        # [cls + pos0, ..., patch_i + pos_i]: zero rows padded in front, then one constant table added.
        padded = F.pad(patches, (0, 0, self.num_prefix, 0)) if self.num_prefix else patches
        return self.dropout(padded + self.prefix_table())


class ViTSelfAttention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.seq_len = config.seq_len
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.use_sdpa = False  # torch runtime only; export keeps the explicit pattern

    def _heads(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        # -1 for the batch keeps the exported Reshape free of the batch size
        return x.reshape(-1, rows, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, cls_only: bool = False,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        """``cls_only``: attend from the [CLS] row alone (keys and values still from every row);
        ``queries``: attend from these rows instead (SigLIP's probe, [1, rows, hidden], broadcast over
        the batch)."""
        if queries is not None:
            rows, source = queries.shape[1], queries
        else:
            rows, source = (1, hidden_states[:, :1]) if cls_only else (self.seq_len, hidden_states)
        q = self._heads(self.query(source), rows)
        k = self._heads(self.key(hidden_states), self.seq_len)
        v = self._heads(self.value(hidden_states), self.seq_len)
        if self.use_sdpa:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        else:
            scores = torch.matmul(q * self.scale, k.transpose(-1, -2))
            probs = self.dropout(torch.softmax(scores, dim=-1))
            context = torch.matmul(probs, v)
        return context.transpose(1, 2).reshape(-1, rows, self.num_heads * self.head_dim)


class ViTSelfOutput(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class ViTAttention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.attention = ViTSelfAttention(config)
        self.output = ViTSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, cls_only: bool = False,
                queries: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.attention(hidden_states, cls_only, queries))


class ViTIntermediate(nn.Module):
    """The MLP's first half; SwiGLU (DINOv2 giant): one Linear to twice the width, ``silu(a) * b``."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.swiglu = config.use_swiglu_ffn
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size * (2 if self.swiglu else 1))
        self.intermediate_act_fn = nn.SiLU() if self.swiglu else _activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dense(hidden_states)
        if self.swiglu:
            gate, up = hidden_states.chunk(2, dim=-1)
            return self.intermediate_act_fn(gate) * up
        return self.intermediate_act_fn(hidden_states)


class ViTOutput(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class LayerScale(nn.Module):
    """DINOv2's per-channel scale on a residual branch (HF name ``lambda1``)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.layerscale_value or 1.0)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class ViTLayer(nn.Module):
    """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x)).

    ``cls_only`` returns the [CLS] row alone, computing no other row past the keys and values: the
    same numbers as the full block's row 0, for a last block whose other rows nobody reads."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = ViTIntermediate(config)
        self.output = ViTOutput(config)
        if config.layerscale_value is not None:
            self.layer_scale1 = LayerScale(config)
            self.layer_scale2 = LayerScale(config)

    def forward(self, hidden_states: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        attended = self.attention(self.layernorm_before(hidden_states), cls_only)
        if hasattr(self, "layer_scale1"):
            attended = self.layer_scale1(attended)
        hidden_states = (hidden_states[:, :1] if cls_only else hidden_states) + attended
        mlp = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        return hidden_states + (self.layer_scale2(mlp) if hasattr(self, "layer_scale2") else mlp)


class ViTEncoder(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        last = len(self.layer) - 1
        for i, layer in enumerate(self.layer):
            hidden_states = layer(hidden_states, cls_only and i == last)
        return hidden_states


class ViTModel(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.embeddings = ViTEmbeddings(config)
        if config.pre_norm:
            self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """The final hidden states [B, seq, hidden] (HF's ``last_hidden_state``, after the final
        LayerNorm); ``cls_only``: the [CLS] row alone, [B, 1, hidden], its last block skipping the rows
        no one reads."""
        return self.from_embeddings(self.embeddings(pixel_values), cls_only)

    def from_embeddings(self, embeddings: torch.Tensor, cls_only: bool = False,
                        final_norm: bool = True) -> torch.Tensor:
        """``final_norm=False``: the blocks' output before the final LayerNorm (CLIP's ``last_hidden_state``,
        whose post_layernorm is applied to the pooled [CLS] alone)."""
        if hasattr(self, "pre_layernorm"):
            embeddings = self.pre_layernorm(embeddings)
        hidden_states = self.encoder(embeddings, cls_only)
        return self.layernorm(hidden_states) if final_norm else hidden_states


class AttentionPoolingHead(nn.Module):
    """SigLIP's head: a learned probe attends over every token, then a residual LayerNorm-MLP; its one
    row is ``pooler_output``. The attention is the blocks' (MatMul-Softmax-MatMul, Q scaled)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.attention = ViTAttention(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.mlp.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = _activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pooled = self.attention(hidden_states, queries=self.probe)
        pooled = pooled + self.mlp.fc2(self.act(self.mlp.fc1(self.layernorm(pooled))))
        return pooled[:, 0]


class ViTForImageClassification(nn.Module):
    """``forward(pixel_values [B, C, H, W])`` -> ``logits [B, num_labels]`` (``config.task ==
    "classification"``) or ``embeddings [B, embedding_size]`` (``"embedding"``: the family's pooled
    output, L2-normalized with ``config.normalize``). One class for every family and task: the config's
    block options decide the tokens, blocks and head (the name is HF ViT's, whose checkpoints load as is)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = ViTModel(config)
        hidden = config.hidden_size
        if config.task == "classification":
            width = 2 * hidden if config.classifier_input == "cls_patch_mean" else hidden
            self.classifier = nn.Linear(width, config.num_labels)
            if config.classifier_input == "cls_distilled":
                self.distillation_classifier = nn.Linear(hidden, config.num_labels)
        if config.pooling_head:
            self.head = AttentionPoolingHead(config)
        if config.task == "embedding" and config.projection_dim:
            self.visual_projection = nn.Linear(hidden, config.projection_dim, bias=False)
        self.reset_parameters()

    @property
    def output_name(self) -> str:
        return "logits" if self.config.task == "classification" else "embeddings"

    def reset_parameters(self) -> None:
        """Truncated-normal(initializer_range) weights, zero biases, unit LayerNorms (HF's init)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        emb = self.vit.embeddings
        for name in ("cls_token", "distillation_token", "register_tokens", "position_embeddings"):
            if hasattr(emb, name):
                nn.init.trunc_normal_(getattr(emb, name), std=std, a=-2 * std, b=2 * std)
        if hasattr(self, "head"):
            nn.init.trunc_normal_(self.head.probe, std=std, a=-2 * std, b=2 * std)
        emb.bake()

    def set_sdpa(self, enabled: bool) -> None:
        """Use torch's fused attention kernel (torch runtime only: same maths, faster)."""
        for module in self.modules():
            if isinstance(module, ViTSelfAttention):
                module.use_sdpa = enabled

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.logits_from_patches(self.vit.embeddings.patch_embeddings(pixel_values))

    @property
    def reads_cls_only(self) -> bool:
        """Whether the output reads the [CLS] row alone (then the last block computes only that row)."""
        c = self.config
        if c.task == "classification":
            return c.classifier_input == "cls"
        return c.pooling == "cls"

    def logits_from_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The output (logits or embeddings) from patch tokens [B, N, hidden] (what the patch embedding
        makes of the pixels)."""
        # Where only [CLS] reaches the head, the last block computes only its row past the keys and
        # values (the same numbers as HF's full pass; ViT-B: 6.9% fewer FLOPs).
        vit, c = self.vit, self.config
        # CLIP's classifier reads the patch tokens before the final LayerNorm (HF keeps that norm for [CLS])
        final_norm = not (c.task == "classification" and c.classifier_input == "patch_mean_before_norm")
        sequence = vit.from_embeddings(vit.embeddings.from_patches(patches), cls_only=self.reads_cls_only,
                                       final_norm=final_norm)
        return self.head_output(sequence)

    def head_output(self, sequence: torch.Tensor) -> torch.Tensor:
        """The final hidden states [B, rows, hidden] (before the final LayerNorm for
        ``patch_mean_before_norm``) -> the task's output."""
        c = self.config
        if c.task == "classification":
            if c.classifier_input == "cls_distilled":  # DeiT with teacher: the mean of both heads
                return (self.classifier(sequence[:, 0]) + self.distillation_classifier(sequence[:, 1])) / 2
            if c.classifier_input == "cls_patch_mean":  # DINOv2: [CLS] beside the patch tokens' mean
                patches = sequence[:, 1 + c.num_register_tokens:]
                return self.classifier(torch.cat([sequence[:, 0], patches.mean(dim=1)], dim=1))
            if c.classifier_input in ("patch_mean", "patch_mean_before_norm"):  # SigLIP, CLIP: the patches' mean
                return self.classifier(sequence[:, c.num_prefix_tokens:].mean(dim=1))
            if c.classifier_input == "map":  # timm's SigLIP: the pooling head's output
                return self.classifier(self.head(sequence))
            return self.classifier(sequence[:, 0])
        pooled = self.head(sequence) if c.pooling == "map" else sequence[:, 0]
        if c.projection_dim:
            pooled = self.visual_projection(pooled)
        if c.normalize:
            # x / max(||x||, 1e-12), as torch.nn.functional.normalize, in plain ops
            pooled = pooled / torch.sqrt((pooled * pooled).sum(dim=-1, keepdim=True)).clamp_min(1e-12)
        return pooled


VisionTransformer = ViTForImageClassification  # the same class, named for what it is across tasks
