"""What the resume tests share: two checkpoints of one run hold the same state, tensor for tensor."""

import torch


def assert_same_state(x: dict, y: dict) -> None:
    """Student, teacher and center weights and the optimizer's state (AdamW moments, steps) are bit-equal."""
    for key in ("student", "teacher", "center"):
        for name, value in x[key].items():
            assert torch.equal(y[key][name], value), f"{key}.{name}"
    for i, state in x.get("optimizer", {"state": {}})["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(y["optimizer"]["state"][i][name]), torch.as_tensor(value)), \
                f"optimizer {i}.{name}"
