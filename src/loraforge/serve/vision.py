"""What the engine keeps for a request with images: the pixels its prefill runs through the vision tower,
and its M-RoPE positions.

Qwen2-VL / Qwen2.5-VL give every token three rotary positions (time, height, width). Text tokens have
three equal ones; an image's tokens follow its patch grid. After the prompt, every token is text again, at
position ``index + delta`` on all three axes, where ``delta`` (the model's ``rope_deltas``) is how far the
prompt's largest position is from its length. A request without images has ``delta`` 0 and needs none of
this, so text and image requests batch together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptVision:
    """``pixel_values`` ``(patches, C*T*P*P)`` and ``image_grid_thw`` ``(images, 3)`` of the prompt's images,
    its M-RoPE ``positions`` ``(3, prompt_len)`` and ``delta`` (see the module docstring)."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    positions: torch.Tensor
    delta: int

    def token_positions(self, first: int, end: int) -> torch.Tensor:
        """``(3, end - first)`` positions of tokens ``first..end-1`` (prompt tokens, then generated ones)."""
        prompt_len = self.positions.shape[1]
        inside = self.positions[:, first:min(end, prompt_len)]
        after = torch.arange(max(first, prompt_len), end, device=self.positions.device) + self.delta
        return torch.cat([inside, after.expand(3, -1)], dim=1)


def text_positions(first: int, end: int, device) -> torch.Tensor:
    """``(3, end - first)``: a text-only sequence's positions on all three axes."""
    return torch.arange(first, end, device=device).expand(3, -1)
