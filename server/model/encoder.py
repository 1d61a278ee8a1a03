"""OneLLM's encoder side: modality tokenizers, CLIP trunk, UPM and the tags of prompt assembly.

Attribute names follow the checkpoint's (`clip.visual.*`, `conv1.<m>`, `resample_layers.<k>.<j>`,
`clip_proj1.<m>`, ...) so the converted weights load with a strict `load_state_dict`.
"""

from collections.abc import Callable

import torch
from torch import nn

from server.engines.linear import Linear, pack_linears
from server.model.clip import Clip, build_visual, patch_tokens, run_trunk
from server.model.upm import Block, Router, mix_experts
from server.model.tokenizers import TOKENIZERS


def _under(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _count(weights: dict[str, torch.Tensor], prefix: str) -> int:
    return 1 + max(int(k[len(prefix):].split(".")[0]) for k in weights if k.startswith(prefix))


def _linear_norm(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(Linear(n_in, n_out), nn.LayerNorm(n_out))


class Encoder(nn.Module):
    def __init__(self, weights: dict[str, torch.Tensor], modalities: list[str], clip_heads: int,
                 upm_heads: int, norm_eps: float):
        super().__init__()
        width = weights["clip.visual.conv1.weight"].shape[0]  # W
        dim = weights["tok_embeddings.weight"].shape[1]  # D
        self.prefix_tokens = weights[f"resample_tokens.{modalities[0]}"].shape[1]  # 30

        self.clip = Clip(build_visual(_under(weights, "clip.visual."), clip_heads))
        self.conv1 = nn.ModuleDict({
            m: TOKENIZERS[m](_under(weights, f"conv1.{m}.")) for m in modalities if m in TOKENIZERS})
        self.positional_embedding = nn.ParameterDict({
            m: nn.Parameter(torch.empty_like(weights[f"positional_embedding.{m}"])) for m in self.conv1})

        hidden = weights["resample_layers.0.0.feed_forward.w1.weight"].shape[0]
        experts = _count(weights, "resample_layers.")
        blocks = _count(weights, "resample_layers.0.")
        self.resample_layers = nn.ModuleList(
            nn.ModuleList(Block(width, upm_heads, hidden, norm_eps) for _ in range(blocks)) for _ in range(experts))

        def per_modality(make):
            return {m: make() for m in modalities}

        self.resample_tokens = nn.ParameterDict(per_modality(lambda: nn.Parameter(torch.empty(1, self.prefix_tokens, width))))
        self.clip_proj1 = nn.ModuleDict(per_modality(lambda: _linear_norm(width, width)))
        self.clip_proj2 = nn.ModuleDict(per_modality(lambda: _linear_norm(width, dim)))
        self.routers = nn.ModuleDict(per_modality(lambda: Router(width, experts)))
        self.start_tag = nn.ParameterDict(per_modality(lambda: nn.Parameter(torch.empty(1, 1, dim))))
        self.end_tag = nn.ParameterDict(per_modality(lambda: nn.Parameter(torch.empty(1, 1, dim))))
        self.tok_embeddings = nn.Embedding(*weights["tok_embeddings.weight"].shape)

        self.load_state_dict(weights, strict=True)
        self.requires_grad_(False)
        self.eval()

    def pack_weights(self, cpu_flags: frozenset[str]) -> None:
        """Packs the bfloat16 weights of the layers that multiply many rows a call, on a CPU with
        `cpu_flags`, in panels or for oneDNN (server/engines/linear.py says why): all but the
        tokenizers', which at batch 1 multiply one."""
        for part in (self.clip, self.resample_layers, self.routers, self.clip_proj1, self.clip_proj2):
            pack_linears(part, cpu_flags)

    @property
    def modalities(self) -> list[str]:
        return list(self.resample_tokens.keys())

    def features(self, modality: str, x: torch.Tensor,
                 between_blocks: Callable[[], None] = lambda: None) -> torch.Tensor:
        """Model input [B, ...] -> CLIP trunk output [B, L+1, W]."""
        visual = self.clip.visual
        if modality in self.conv1:
            return run_trunk(visual, self.conv1[modality](x), self.positional_embedding[modality], between_blocks)
        frames = x if x.dim() == 5 else x.unsqueeze(1)  # image [B, 3, H, W] is one frame
        b, t = frames.shape[:2]
        feats = run_trunk(visual, patch_tokens(visual, frames.flatten(0, 1)), visual.positional_embedding,
                          between_blocks)
        return feats.view(b, t, *feats.shape[1:]).mean(1)  # video/rgbd/rgbn: average over frames

    @torch.inference_mode()
    def forward(self, modality: str, x: torch.Tensor,
                between_blocks: Callable[[], None] = lambda: None) -> torch.Tensor:
        """Model input [B, ...] -> prefix [B, 30, D]. `between_blocks` runs before each transformer
        block (CLIP's and the UPM's): there a run of lower priority can wait for more urgent work."""
        if modality not in self.resample_tokens:
            raise KeyError(f"this model has no '{modality}' modality")
        h = self.clip_proj1[modality](self.features(modality, x, between_blocks))  # [B, L+1, W]
        h = torch.cat([self.resample_tokens[modality].expand(h.shape[0], -1, -1), h], dim=1)
        out = mix_experts(self.resample_layers, self.routers[modality], h, self.prefix_tokens,
                          between_blocks)  # [B, 30, W]
        return self.clip_proj2[modality](out)  # [B, 30, D]

    def block(self, modality: str, prefix: torch.Tensor) -> torch.Tensor:
        """prefix [30, D] -> the attachment block [32, D]: start tag, prefix rows, end tag."""
        return torch.cat([self.start_tag[modality][0], prefix, self.end_tag[modality][0]])

    @torch.inference_mode()
    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        return self.tok_embeddings(torch.tensor(ids, dtype=torch.long, device=self.tok_embeddings.weight.device))
