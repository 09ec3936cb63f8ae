"""Renaming foreign state dicts (official `.pth`, transformers format) into our module names.

The rules of each format are in `official_format` and `transformers_keys`; this module applies them.

A rule is `(pattern, replacement)`: a regular expression matched against the whole key and a
replacement string or callable, as for `re.sub`. The first matching rule wins; a key that no rule
matches is an error (strict loading, never `strict=False`). A replacement may end in `#q`, `#k` or
`#v`: the tensor is then one third of a packed query/key/value projection, and the three parts are
concatenated along dim 0 in q, k, v order (transformers splits what `nn.MultiheadAttention` and
timm's Swin keep packed). A replacement of `None` drops the key (for documented, unused tensors).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

Replacement = str | Callable[[re.Match], str] | None
Rule = tuple[str, Replacement]

_PACKED_ORDER = ("q", "k", "v")


class KeyMappingError(KeyError):
    """A checkpoint key that maps to nothing, or aliases of one name with different values."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0])


def rename_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    rules: Iterable[Rule],
) -> dict[str, torch.Tensor]:
    """Apply `rules` to every key; pack `#q/#k/#v` parts; check that aliases agree.

    Several source keys may map to the same target (the reference stores its shared box head
    under two names); they must then hold equal tensors.

    Raises:
        KeyMappingError: a key matches no rule, a packed projection misses a part, or two aliases
            of one target differ.
    """
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    renamed: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, tensor in state_dict.items():
        for pattern, replacement in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if replacement is None:
                break
            target = replacement(match) if callable(replacement) else match.expand(replacement)
            if "#" in target:
                target, part = target.rsplit("#", 1)
                packed.setdefault(target, {})[part] = tensor
            else:
                _put(renamed, sources, target, tensor, key)
            break
        else:
            unmatched.append(key)
    if unmatched:
        shown = ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "")
        raise KeyMappingError(f"{len(unmatched)} checkpoint key(s) match no known name: {shown}")
    for target, parts in packed.items():
        missing = [p for p in _PACKED_ORDER if p not in parts]
        if missing:
            raise KeyMappingError(f"packed projection {target} lacks its {'/'.join(missing)} part")
        _put(renamed, sources, target, torch.cat([parts[p] for p in _PACKED_ORDER]), target)
    return renamed


def _put(renamed: dict, sources: dict, target: str, tensor: torch.Tensor, source: str) -> None:
    if target in renamed:
        if not torch.equal(renamed[target], tensor):
            raise KeyMappingError(
                f"{source} and {sources[target]} both map to {target} but hold different values"
            )
        return
    renamed[target] = tensor
    sources[target] = source
