"""Honesty check of sae-kit's SAELens / sparsify interop against the real libraries (not part of CI).

Run from the repository root, in this order (the peer venvs are those of benchmarks/train_step.py):

    python benchmarks/peers/interop_check.py export /tmp/interop     # main env: our SAEs saved with format="saelens"/"sparsify"
    ~/.cache/sae-kit/bench-venvs/saelens/bin/python benchmarks/peers/interop_check.py check /tmp/interop
    ~/.cache/sae-kit/bench-venvs/sparsify/bin/python benchmarks/peers/interop_check.py check /tmp/interop
    python benchmarks/peers/interop_check.py verify /tmp/interop     # main env: the peers' own directories, loaded by sae-kit

`export` writes random "trained-looking" SAEs of every architecture a peer can hold, the shared inputs x and our codes
and reconstructions of x. `check` loads each of our directories with the installed peer's own loader
(sae_lens.SAE.load_from_disk, sparsify.SparseCoder.load_from_disk; with SAELens also its sparsify converter), prints
max |Δ| of codes and reconstructions against ours, and then saves SAEs built by the peer itself (SAELens: save_model,
and save_inference_model for batchtopk / rescaled topk training SAEs; sparsify: save_to_disk) with the peer's codes.
`verify` loads those with sae_kit.load_sae and prints the same differences. float32 throughout; differences of
~1e-6 are rounding (folds and summation order), anything larger is a real mismatch. `check` imports only torch,
safetensors and the peer, so it runs inside the peer venvs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

D_IN, D_SAE, K, N = 16, 64, 4, 256
META = {"model_name": "tiny", "hook_name": "blocks.6.hook_resid_post", "context_size": 128}


def report(lib: str, name: str, codes: Tensor, x_hat: Tensor, ref: dict[str, Tensor]) -> None:
    dc = (codes.float() - ref["codes"]).abs().max().item()
    dx = (x_hat.float() - ref["x_hat"]).abs().max().item()
    l0 = (ref["codes"] != 0).sum(-1).float().mean().item()
    print(f"{lib:24s} {name:38s} max|Δcodes| {dc:9.2e}   max|Δx̂| {dx:9.2e}   (L0 {l0:5.2f})", flush=True)


def fail(lib: str, name: str, err: Exception) -> None:
    print(f"{lib:24s} {name:38s} FAILED: {type(err).__name__}: {' '.join(str(err).split())[:160]}", flush=True)


# ---------------------------------------------------------------------------------------------- main env (sae-kit)
def export(out: Path) -> None:
    """Our SAEs in both peer formats, the inputs, and our codes/reconstructions."""
    from sae_kit import SAE, SAEConfig

    torch.manual_seed(0)
    x = torch.randn(N, D_IN)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"x": x}, str(out / "inputs.safetensors"))

    def make(arch: str, **kw) -> SAE:
        sae = SAE(
            SAEConfig.from_dict(
                {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "k": K, "metadata": dict(META), **kw}
            )
        )
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.2 * torch.randn_like(p))
            sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # atoms of norm != 1: nothing may depend on unit norms
            if "threshold" in sae.sparsifier.state_tensors():
                sae.sparsifier.threshold.copy_(0.3 * torch.rand(D_SAE) + 0.01)
        sae.train()(x)  # mutual/feature choice learn their thresholds
        return sae.eval()

    saes = {
        ("saelens", arch): make(arch)
        for arch in ("relu", "topk", "abstopk", "jumprelu", "mutual_choice", "feature_choice", "mpsae")
    }
    saes[("saelens", "topk-no-bdec-sub")] = make("topk", apply_b_dec_to_input=False)
    saes[("sparsify", "topk")] = make("topk")
    saes[("sparsify", "topk-no-bdec-sub")] = make("topk", apply_b_dec_to_input=False)
    for (fmt, name), sae in saes.items():
        directory = out / "ours" / fmt / name / ("layers.6" if fmt == "sparsify" else "")
        sae.save(directory, format=fmt)
        with torch.no_grad():
            codes = sae.encode(x)
            save_file({"codes": codes, "x_hat": sae.decode(codes)}, str(out / "ours" / fmt / f"{name}.ref.safetensors"))
    print(f"wrote {len(saes)} SAE directories under {out / 'ours'}")


def verify(out: Path) -> None:
    """The peers' own directories, loaded with sae_kit.load_sae."""
    from sae_kit import load_sae

    x = load_file(str(out / "inputs.safetensors"))["x"]
    refs = sorted((out / "peer").glob("*/*.ref.safetensors"))
    if not refs:
        sys.exit(f"no peer directories under {out / 'peer'}; run `check` in a peer venv first")
    for ref_file in refs:
        name = ref_file.name.removesuffix(".ref.safetensors")
        lib = f"sae-kit <- {ref_file.parent.name}"
        directory = ref_file.parent / name / ("layers.6" if ref_file.parent.name == "sparsify" else "")
        try:
            sae = load_sae(directory)
            with torch.no_grad():
                codes = sae.encode(x)
                report(lib, f"{name} as {sae.cfg.architecture}", codes, sae.decode(codes), load_file(str(ref_file)))
        except Exception as err:  # report and go on: this is a survey
            fail(lib, name, err)


# ------------------------------------------------------------------------------------------------- peer venvs
def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn_like(p))


def check_saelens(out: Path, x: Tensor) -> None:
    from importlib.metadata import version

    from sae_lens import SAE as LensSAE
    from sae_lens.loading.pretrained_sae_loaders import sparsify_disk_loader

    print(f"sae_lens {version('sae_lens')}")
    lib = "sae_lens <- sae-kit"
    for ref_file in sorted((out / "ours" / "saelens").glob("*.ref.safetensors")):
        name = ref_file.name.removesuffix(".ref.safetensors")
        try:
            sae = LensSAE.load_from_disk(ref_file.parent / name)
            with torch.no_grad():
                codes = sae.encode(x)
                report(lib, f"{name} as {sae.cfg.architecture()}", codes, sae.decode(codes), load_file(str(ref_file)))
        except Exception as err:  # report and go on: this is a survey
            fail(lib, name, err)
    for ref_file in sorted((out / "ours" / "sparsify").glob("*.ref.safetensors")):
        name = ref_file.name.removesuffix(".ref.safetensors")
        try:  # SAELens's own sparsify converter, in float32 (it defaults to bfloat16)
            sae = LensSAE.load_from_disk(
                ref_file.parent / name / "layers.6", dtype="float32", converter=sparsify_disk_loader
            )
            with torch.no_grad():
                codes = sae.encode(x)
                report("sae_lens sparsify conv.", name, codes, sae.decode(codes), load_file(str(ref_file)))
        except Exception as err:
            fail("sae_lens sparsify conv.", name, err)

    # SAEs made and saved by SAELens itself, with SAELens's codes, for `verify`.
    from sae_lens.saes import (
        AbsTopKSAE,
        AbsTopKSAEConfig,
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        MatchingPursuitSAE,
        MatchingPursuitSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    peer = out / "peer" / "saelens"
    meta = SAEMetadata(**META)
    made = {
        "standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta)),
        "standard-no-bdec-sub": StandardSAE(
            StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False, metadata=meta)
        ),
        "topk-rescaled": TopKSAE(
            TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True, metadata=meta)
        ),
        "abstopk": AbsTopKSAE(AbsTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, metadata=meta)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta)),
        "matching_pursuit": MatchingPursuitSAE(
            MatchingPursuitSAEConfig(d_in=D_IN, d_sae=D_SAE, residual_threshold=0.0, max_iterations=8, metadata=meta)
        ),
    }
    for name, sae in made.items():
        _randomise(sae)
        if name == "jumprelu":
            with torch.no_grad():
                sae.threshold.copy_(0.3 * torch.rand(D_SAE))
                sae.threshold[:4] = 0.0  # SAELens treats θ <= 0 as θ = 0 (ReLU first)
        sae.save_model(peer / name)
    trained = {  # training SAEs, saved the way SAELens's runner saves a finished run (the inference conversion)
        "batchtopk-trained": BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=float(K))),
        "topk-trained-rescaled": TopKTrainingSAE(
            TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True)
        ),
    }
    for name, sae in trained.items():
        _randomise(sae)
        if name == "batchtopk-trained":
            sae.topk_threshold = torch.tensor(0.4, dtype=torch.double)
        sae.save_inference_model(peer / name)
    for name in [*made, *trained]:
        sae = LensSAE.load_from_disk(peer / name)
        with torch.no_grad():
            codes = sae.encode(x)
            save_file({"codes": codes, "x_hat": sae.decode(codes)}, str(peer / f"{name}.ref.safetensors"))
    print(f"wrote {len(made) + len(trained)} SAELens-made directories under {peer}")


def check_sparsify(out: Path, x: Tensor) -> None:
    import os
    from importlib.metadata import version

    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # CPU: the eager decoder
    from sparsify import SparseCoder, SparseCoderConfig

    print(f"sparsify {version('eai-sparsify')}")

    def dense(coder: SparseCoder) -> tuple[Tensor, Tensor]:
        enc = coder.encode(x)
        codes = torch.zeros(x.shape[0], coder.num_latents).scatter(1, enc.top_indices, enc.top_acts)
        return codes, coder.decode(enc.top_acts, enc.top_indices)

    for ref_file in sorted((out / "ours" / "sparsify").glob("*.ref.safetensors")):
        name = ref_file.name.removesuffix(".ref.safetensors")
        try:
            with torch.no_grad():
                report(
                    "sparsify <- sae-kit",
                    name,
                    *dense(SparseCoder.load_from_disk(ref_file.parent / name / "layers.6")),
                    load_file(str(ref_file)),
                )
        except Exception as err:
            fail("sparsify <- sae-kit", name, err)
    peer = out / "peer" / "sparsify"
    for name, normalize in (("topk", True), ("topk-normalize_decoder-false", False)):
        coder = SparseCoder(
            D_IN, SparseCoderConfig(num_latents=D_SAE, k=K, normalize_decoder=normalize), dtype=torch.float32
        )
        _randomise(coder)
        coder.save_to_disk(peer / name / "layers.6")
        with torch.no_grad():
            codes, x_hat = dense(coder)
        save_file({"codes": codes, "x_hat": x_hat}, str(peer / f"{name}.ref.safetensors"))
    print(f"wrote 2 sparsify-made directories under {peer}")


def check(out: Path) -> None:
    """Our directories through the installed peer's loader, then the peer's own directories for `verify`."""
    torch.manual_seed(1)
    x = load_file(str(out / "inputs.safetensors"))["x"]
    try:
        import sae_lens  # noqa: F401
    except ImportError:
        check_sparsify(out, x)
    else:
        check_saelens(out, x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=("export", "check", "verify"))
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"export": export, "check": check, "verify": verify}[args.step](args.out)


if __name__ == "__main__":
    main()
