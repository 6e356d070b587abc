"""Module names of SD3 network files: sd-scripts / ComfyUI (``lora_unet_*``, ``lora_te1_*`` …) and
diffusers / PEFT (``transformer.transformer_blocks.N.attn.to_q``, ``text_encoder.*`` …).

Text encoders keep their Hugging Face module paths on both sides (``lora_te1_`` ↔ ``text_encoder.``,
``lora_te2_`` ↔ ``text_encoder_2.``, ``lora_te3_`` ↔ ``text_encoder_3.``). The MMDiT map is not
written out here: it is read off diffusers' own single-file converter
(``convert_sd3_transformer_checkpoint_to_diffusers``, the map the MMDiT parity tests use) by running
it on a probe checkpoint whose weight rows carry (key index, row index). Every diffusers weight then
tells which SAI weight and which rows it came from: a fused qkv goes to three targets, one third each;
the adaLN of the last context block and of the final layer has its (shift, scale) halves swapped.
Rows are described at a granularity (``parts``) so the map holds for any model width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from library.errors import UserError
from networks.targets import CLIP_PATTERN, PREFIXES, T5_PATTERN

PEFT_PREFIXES = {"unet": "transformer", "te1": "text_encoder", "te2": "text_encoder_2", "te3": "text_encoder_3"}
# module-path atoms that contain "_" themselves (everything else splits at "_")
_COMPOUNDS = ("joint_blocks", "context_block", "x_block", "adaLN_modulation", "context_embedder", "t_embedder",
              "x_embedder", "y_embedder", "final_layer", "text_model", "self_attn", "q_proj", "k_proj", "v_proj",
              "out_proj", "wi_0", "wi_1")
# diffusers' names of a fused projection (``fuse_qkv_projections``), keyed by the name of its q part
FUSED_QKV = {"to_q": "to_qkv", "add_q_proj": "to_added_qkv"}
_BLOCK = re.compile(r"^(joint_blocks|transformer_blocks)\.(\d+)\.")
_PRE_ONLY_SAI = "joint_blocks.{i}.context_block.adaLN_modulation.1"
_PRE_ONLY_DIFFUSERS = "transformer_blocks.{i}.norm1_context.linear"
_PROBE_ROWS = 6  # divisible by 2 and 3: every split the converter makes shows at this size


def split_name(name: str) -> tuple[str, str]:
    """``lora_unet_joint_blocks_0_x_block_attn_qkv`` -> ("unet", "joint_blocks.0.x_block.attn.qkv")."""
    for group, prefix in PREFIXES.items():
        if name.startswith(prefix + "_"):
            tokens = name[len(prefix) + 1:].split("_")
            return group, ".".join(_join_compounds(tokens))
    raise UserError(f"{name!r} is not an SD3 network module name (lora_unet_*, lora_te1_*, lora_te2_*, lora_te3_*)")


def _join_compounds(tokens: list[str]) -> list[str]:
    atoms, i = [], 0
    compounds = sorted((c.split("_") for c in _COMPOUNDS), key=len, reverse=True)
    while i < len(tokens):
        match = next((c for c in compounds if tokens[i:i + len(c)] == c), [tokens[i]])
        atoms.append("_".join(match))
        i += len(match)
    return atoms


def join_name(group: str, path: str) -> str:
    return f"{PREFIXES[group]}_{path.replace('.', '_')}"


def check_text_path(group: str, path: str, source: str) -> None:
    pattern = T5_PATTERN if group == "te3" else CLIP_PATTERN
    if not pattern.search("." + path):
        raise UserError(f"{source}: {PEFT_PREFIXES[group]} module {path!r} is not a layer SD3 networks adapt")


@dataclass(frozen=True)
class RowPart:
    """One diffusers layer made of rows of one SAI layer: the SAI rows cut into ``parts`` equal blocks,
    these ``blocks`` of them in this order (qkv -> to_k is parts 3, blocks (1,); a swap is 2, (1, 0))."""

    target: str
    parts: int
    blocks: tuple[int, ...]

    def rows(self, sai_rows: int) -> torch.Tensor:
        """Indices of the SAI weight's rows, in the diffusers weight's order."""
        if sai_rows % self.parts:
            raise UserError(f"{self.target}: {sai_rows} rows cannot be cut into {self.parts} equal parts")
        size = sai_rows // self.parts
        return torch.cat([torch.arange(b * size, (b + 1) * size) for b in self.blocks])

    def sai_rows(self, target_rows: int) -> int:
        """The SAI layer's row count, from the row count of this part."""
        return target_rows * self.parts // len(self.blocks)

    @property
    def identity(self) -> bool:
        return self.blocks == tuple(range(self.parts))


def _granular(units: list[int]) -> tuple[int, tuple[int, ...]]:
    """Probe row indices -> the coarsest (parts, blocks) that describes them."""
    for parts in (1, 2, 3, _PROBE_ROWS):
        size = _PROBE_ROWS // parts
        blocks = tuple(units[j] // size for j in range(0, len(units), size))
        if units == [b * size + k for b in blocks for k in range(size)]:
            return parts, blocks
    raise AssertionError(f"unexpected row map {units}")


def _probe_map() -> dict[str, list[tuple[str, int, tuple[int, ...]]]]:
    """{SAI layer: [(diffusers layer, parts, blocks)]} of a 2-block dual-attention qk-norm MMDiT."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    from library.models.mmdit_config import MMDiTConfig, mmdit_shapes

    cfg = MMDiTConfig(depth=2, hidden_size=6, num_heads=1, pos_embed_max_size=1, qk_norm=True,
                      dual_attention_layers=(0, 1))
    keys = sorted(mmdit_shapes(cfg))
    probe: dict[str, torch.Tensor] = {}
    for index, key in enumerate(keys):
        if key.endswith(".weight") and not key.endswith((".ln_q.weight", ".ln_k.weight")):
            ids = torch.full((_PROBE_ROWS,), float(index))
            probe[key] = torch.stack([ids, torch.arange(_PROBE_ROWS, dtype=torch.float32)], dim=1)  # (6, 2)
        else:
            probe[key] = torch.zeros(_PROBE_ROWS)
    out: dict[str, list[tuple[str, int, tuple[int, ...]]]] = {}
    for d_key, tensor in convert_sd3_transformer_checkpoint_to_diffusers(probe).items():
        if tensor.dim() != 2 or not d_key.endswith(".weight"):
            continue
        source = keys[int(tensor[0, 0])].removesuffix(".weight")
        parts, blocks = _granular([int(v) for v in tensor[:, 1]])
        out.setdefault(source, []).append((d_key.removesuffix(".weight"), parts, blocks))
    return out


def _template(path: str) -> tuple[str, str | None]:
    match = _BLOCK.match(path)
    if match is None:
        return path, None
    return f"{match.group(1)}.{{i}}.{path[match.end():]}", match.group(2)


class UnetKeyMap:
    """SAI MMDiT layer paths <-> diffusers ``SD3Transformer2DModel`` layer paths with their row maps.

    Templates come from probe block 0 (a full joint block) and, for the pre-only context adaLN of the
    last block, from probe block 1; the caller tells the two apart by shape (2·D rows instead of 6·D).
    """

    def __init__(self) -> None:
        self._forward: dict[tuple[str, bool], list[RowPart]] = {}
        self._reverse: dict[tuple[str, bool], tuple[str, RowPart]] = {}
        for source, targets in _probe_map().items():
            template, block = _template(source)
            if block == "1" and template != _PRE_ONLY_SAI:
                continue  # block 0 is the template of every other block layer
            pre_only = block == "1"
            parts = [RowPart(_template(t)[0], p, b) for t, p, b in targets]
            self._forward[(template, pre_only)] = parts
            for part in parts:
                self._reverse[(part.target, pre_only)] = (template, part)

    def to_diffusers(self, path: str, out_rows: int, in_features: int) -> list[RowPart]:
        """The diffusers layers that the SAI layer ``path`` (weight ``out_rows`` x ``in_features``) becomes."""
        template, block = _template(path)
        pre_only = template == _PRE_ONLY_SAI and out_rows == 2 * in_features
        parts = self._forward.get((template, pre_only))
        if parts is None:
            raise UserError(f"MMDiT layer {path!r} has no counterpart in diffusers' SD3Transformer2DModel")
        return [RowPart(p.target.replace("{i}", block or ""), p.parts, p.blocks) for p in parts]

    def to_sai(self, target: str, target_rows: int, in_features: int) -> tuple[str, RowPart]:
        """(SAI layer path, its RowPart) of the diffusers layer ``target`` (weight rows x in_features)."""
        template, block = _template(target)
        pre_only = template == _PRE_ONLY_DIFFUSERS and target_rows == 2 * in_features
        found = self._reverse.get((template, pre_only))
        if found is None:
            raise UserError(f"diffusers transformer layer {target!r} has no counterpart in the SAI MMDiT")
        path, part = found
        fill = block or ""
        return path.replace("{i}", fill), RowPart(part.target.replace("{i}", fill), part.parts, part.blocks)

    def fused_target(self, parts: list[RowPart]) -> str | None:
        """The fused diffusers projection (``to_qkv`` / ``to_added_qkv``) when ``parts`` are the q, k, v
        thirds of one SAI qkv layer; None otherwise."""
        if sorted(p.blocks for p in parts) != [(0,), (1,), (2,)] or any(p.parts != 3 for p in parts):
            return None
        head, _, leaf = next(p for p in parts if p.blocks == (0,)).target.rpartition(".")
        return f"{head}.{FUSED_QKV[leaf]}" if leaf in FUSED_QKV else None

    def unfused(self, target: str) -> str | None:
        """The q-part name of a fused diffusers projection (``…attn.to_qkv`` -> ``…attn.to_q``), else None."""
        head, _, leaf = target.rpartition(".")
        names = {fused: q for q, fused in FUSED_QKV.items()}
        return f"{head}.{names[leaf]}" if leaf in names else None
