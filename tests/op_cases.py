"""Random inputs for the fused op and the comparison rule shared by the op tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from emovec.reference import naive_sequence, steer_project_reference


@dataclass
class Case:
    n: int
    d: int
    k: int
    a: int
    table_rows: int = 4
    num_segments: int = 3
    center: bool = True
    steer: bool = True
    capture: bool = True
    row_pad: int = 0  # extra columns in each row of h's storage (strided rows)
    weights_fp32: bool = False  # table/probes in fp32 while h is fp16/bf16
    clamp: int = 0  # regulation directions (not orthogonal), bounds per slot
    relative: bool = False  # bounds as cosines

    def __str__(self) -> str:
        return (f"N{self.n}-d{self.d}-K{self.k}-A{self.a}" + (f"-pad{self.row_pad}" if self.row_pad else "")
                + (f"-C{self.clamp}{'rel' if self.relative else ''}" if self.clamp else ""))


def make_inputs(case: Case, dtype: torch.dtype, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    storage = randn(case.n, case.d + case.row_pad)
    h = storage[:, : case.d]
    wdtype = torch.float32 if case.weights_fp32 else dtype
    inputs = {"h_storage": storage, "h": h}
    inputs["slots"] = (torch.randint(-1, case.table_rows, (case.n,), generator=g)
                       if (case.steer or case.a or case.clamp) else None)
    inputs["table"] = randn(case.table_rows, case.d) * 0.5 if case.steer else None
    if case.a:
        q, _ = torch.linalg.qr(randn(case.d, case.a))  # orthonormal directions
        inputs["ablate"] = q.T[: case.a].contiguous()
    else:
        inputs["ablate"] = None
    inputs["probes"] = randn(case.k, case.d) / case.d**0.5 if case.k else None
    inputs["center"] = randn(case.d) * 0.1 if case.center else None
    if case.clamp:
        # random unit directions (not orthogonal); bounds around zero, tight enough that many rows are corrected,
        # with some sides unbounded (±inf)
        inputs["clamp"] = torch.nn.functional.normalize(randn(case.clamp, case.d), dim=1)
        scale = 0.5 / case.d**0.5 if case.relative else 0.5
        lo, hi = -randn(case.table_rows, case.clamp).abs() * scale, randn(case.table_rows, case.clamp).abs() * scale
        lo[torch.rand(lo.shape, generator=g) < 0.2] = -math.inf
        hi[torch.rand(hi.shape, generator=g) < 0.2] = math.inf
        inputs["bounds"] = torch.stack([lo, hi], dim=-1)
    else:
        inputs["clamp"] = inputs["bounds"] = None
    if case.capture:
        seg = torch.randint(-1, case.num_segments, (case.n,), generator=g)
        inputs["segments"] = seg
        inputs["sums"] = randn(case.num_segments, case.d)  # accumulated into: start from non-zero values
        inputs["counts"] = torch.randint(0, 5, (case.num_segments,), generator=g).double()
    else:
        inputs["segments"] = inputs["sums"] = inputs["counts"] = None
    # cast: h storage to dtype (keeps strides), weights to wdtype
    storage_cast = storage.to(dtype)
    cast = {"h_storage": storage_cast, "h": storage_cast[:, : case.d]}
    for name in ("table", "ablate", "probes", "center", "clamp"):
        cast[name] = inputs[name].to(wdtype) if inputs[name] is not None else None
    cast["bounds"] = inputs["bounds"].float() if inputs["bounds"] is not None else None
    cast["relative"] = case.relative
    for name in ("slots", "segments"):
        cast[name] = inputs[name]
    for name in ("sums", "counts"):
        cast[name] = inputs[name].float() if inputs[name] is not None else None
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in cast.items()}


def oracle(inputs: dict) -> dict:
    """The reference in float64 on the (already rounded) inputs."""
    f64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}
    h = f64["h"].clone()
    n = h.shape[0]
    k = f64["probes"].shape[0] if f64["probes"] is not None else 0
    scores = torch.empty(n, k, dtype=torch.float64, device=h.device) if k else None
    norms = torch.empty(n, dtype=torch.float64, device=h.device)
    sums = f64["sums"].clone() if f64["sums"] is not None else None
    counts = f64["counts"].clone() if f64["counts"] is not None else None
    corrections = (torch.empty(n, f64["clamp"].shape[0], dtype=torch.float64, device=h.device)
                   if f64["clamp"] is not None else None)
    steer_project_reference(h, f64["slots"], f64["table"], f64["ablate"], f64["probes"], f64["center"],
                            scores, norms, f64["segments"], sums, counts, None, f64["clamp"], f64["bounds"],
                            inputs["relative"], corrections)
    return {"h": h, "scores": scores, "norms": norms, "sums": sums, "counts": counts, "corrections": corrections}


def torch_own(inputs: dict) -> dict:
    """PyTorch's own computation in h's dtype (the naive op sequence): its error sets the tolerance. With
    regulation (no naive sequence for it), the package's reference computing in fp32 on h's dtype."""
    dtype = inputs["h"].dtype
    if inputs["clamp"] is not None:
        h = inputs["h"].clone()
        n = h.shape[0]
        k = inputs["probes"].shape[0] if inputs["probes"] is not None else 0
        out = {"h": h, "scores": torch.empty(n, k, device=h.device) if k else None,
               "norms": torch.empty(n, device=h.device),
               "sums": inputs["sums"].clone() if inputs["sums"] is not None else None,
               "counts": inputs["counts"].clone() if inputs["counts"] is not None else None,
               "corrections": torch.empty(n, inputs["clamp"].shape[0], device=h.device)}
        steer_project_reference(h, inputs["slots"], inputs["table"], inputs["ablate"], inputs["probes"],
                                inputs["center"], out["scores"], out["norms"], inputs["segments"], out["sums"],
                                out["counts"], None, inputs["clamp"], inputs["bounds"], inputs["relative"],
                                out["corrections"])
        return out
    h = inputs["h"].clone()
    w = {name: (inputs[name].to(dtype) if inputs[name] is not None else None) for name in ("table", "ablate", "probes", "center")}
    sums = inputs["sums"].clone() if inputs["sums"] is not None else None
    counts = inputs["counts"].clone() if inputs["counts"] is not None else None
    scores, norms = naive_sequence(h, inputs["slots"], w["table"], w["ablate"], w["probes"], w["center"],
                                   inputs["segments"], sums, counts)
    return {"h": h, "scores": scores, "norms": norms, "sums": sums, "counts": counts}


FLOORS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.float64: 1e-10, torch.bfloat16: 1e-2}


def assert_close_by_rule(name: str, got: torch.Tensor, want: torch.Tensor, own: torch.Tensor | None, dtype) -> None:
    """flash-attention's rule: |got - want| <= 2 * |torch's own - want| + floor, elementwise-max form.

    ``floor`` scales with the magnitude of the expected values. Prints the worst mismatching indices.
    """
    got64, want64 = got.double().cpu(), want.double().cpu()
    assert got64.shape == want64.shape, f"{name}: shape {tuple(got64.shape)} != {tuple(want64.shape)}"
    if got64.numel() == 0:
        return
    assert torch.isfinite(got64).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(got64))[:5].tolist()}"
    error = (got64 - want64).abs()
    own_error = (own.double().cpu() - want64).abs().max().item() if own is not None else 0.0
    scale = max(1.0, want64.abs().max().item())
    bound = 2 * own_error + FLOORS[dtype] * scale
    if error.max().item() > bound:
        worst = torch.topk(error.flatten(), min(5, error.numel())).indices
        idx = [tuple(int(v) for v in torch.unravel_index(i, error.shape)) for i in worst]
        raise AssertionError(
            f"{name}: max error {error.max().item():.3g} > bound {bound:.3g} (torch's own {own_error:.3g}); "
            f"worst at {idx}: got {[got64[i].item() for i in idx]}, want {[want64[i].item() for i in idx]}"
        )
