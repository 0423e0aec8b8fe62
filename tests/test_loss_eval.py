import math

import torch

from nanochat.loss_eval import evaluate_bpb


class FixedLoss(torch.nn.Module):
    """Returns a known per-token loss: target id / 10 nats (0 where the target is ignored)."""

    def forward(self, inputs, targets, loss_reduction="mean"):
        assert loss_reduction == "none"
        return torch.where(targets >= 0, targets.float() / 10, 0.0)


def test_evaluate_bpb_matches_hand_computation_and_is_inf_without_bytes():
    token_bytes = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32)  # token 0 is "special"
    targets = torch.tensor([[1, 0, 4], [3, -1, 2]])
    # counted: targets 1, 4, 3, 2 -> nats 0.1 + 0.4 + 0.3 + 0.2, bytes 1 + 4 + 3 + 2
    expected = (0.1 + 0.4 + 0.3 + 0.2) / (math.log(2) * 10)
    batches = [(torch.zeros_like(targets), targets)] * 3
    assert math.isclose(
        evaluate_bpb(FixedLoss(), batches, steps=3, token_bytes=token_bytes), expected, rel_tol=1e-6
    )
    no_bytes = [(torch.zeros(1, 3), torch.tensor([[0, 0, -1]]))]  # only the special token and an ignored one
    assert evaluate_bpb(FixedLoss(), no_bytes, steps=1, token_bytes=token_bytes) == float("inf")
