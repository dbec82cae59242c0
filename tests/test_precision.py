"""precision auto: the one decision (pure, for any hardware), what this machine decides, and
bf16 against fp32 where it is asked for: features, and a training run's losses."""
import numpy as np
import pytest
import torch
from conftest import OpLog

from sentdisc import ByteLM, ModelConfig, featurize
from sentdisc.errors import InputError
from sentdisc.features import feature_precision
from sentdisc.precision import Hardware, choose
from sentdisc.score import fit_replicas
from sentdisc.train import TrainConfig
from sentdisc.train.step import autocast_for, train_step

AVX2 = Hardware("cpu", capability="AVX2")
SAPPHIRE_RAPIDS = Hardware("cpu", avx512_bf16=True, amx=True, capability="AVX512")
ZEN4 = Hardware("cpu", avx512_bf16=True, capability="AVX512")


@pytest.mark.parametrize("requested, hw, want, why", [
    ("auto", AVX2, "fp32", "no native bf16 (no AVX-512 BF16 or AMX; torch sees AVX2)"),
    ("auto", ZEN4, "bf16", "this CPU (AVX-512 BF16) multiplies bf16 natively"),
    ("auto", SAPPHIRE_RAPIDS, "bf16", "this CPU (AVX-512 BF16, AMX) multiplies bf16 natively"),
    ("auto", Hardware("cuda"), "bf16", "the CUDA device multiplies bf16 natively"),
    ("auto", Hardware("mps"), "fp32", "float32 on mps"),
    ("fp32", ZEN4, "fp32", "fp32 as asked"),
    ("bf16", AVX2, "bf16", "bf16 as asked, though this CPU has no native bf16"),
    ("fp16", Hardware("cuda"), "fp16", "fp16 as asked"),
])
def test_auto_is_bf16_exactly_where_it_is_native(requested, hw, want, why):
    got, reason = choose(requested, hw)
    assert got == want and why in reason


def test_bad_requests_are_errors():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        choose("fp16", ZEN4)
    with pytest.raises(ValueError, match="precision must be one of"):
        choose("int8", AVX2)



def test_sentdisc_precision_is_read_case_insensitively_and_a_bad_value_is_input_error():
    assert choose("auto", Hardware.detect("cpu", environ={"SENTDISC_PRECISION": "FP32"})) == \
        ("fp32", "precision auto: fp32, as SENTDISC_PRECISION says")
    assert Hardware.detect("cuda", environ={"SENTDISC_PRECISION": " Bf16 "}).auto == "bf16"
    # an InputError, so every command prints it as one line (exit 2), not a traceback
    with pytest.raises(InputError, match=r"^SENTDISC_PRECISION must be fp32 or bf16 \(or unset\), "
                                         r"got 'fp64'$"):
        Hardware.detect("cpu", environ={"SENTDISC_PRECISION": "fp64"})


def test_this_machine_and_every_entry_point_default_to_auto(monkeypatch):
    import torch.cpu

    hw = Hardware.detect("cpu", environ={})
    assert (hw.avx512_bf16, hw.amx) == (torch.cpu._is_avx512_bf16_supported(),
                                         torch.cpu._is_amx_tile_supported())
    assert choose("auto", hw)[0] == ("bf16" if hw.native_bf16 else "fp32")
    # SENTDISC_PRECISION fixes what auto means (this suite runs with fp32)
    fixed = Hardware.detect("cpu", environ={"SENTDISC_PRECISION": "bf16"})
    assert choose("auto", fixed) == ("bf16", "precision auto: bf16, as SENTDISC_PRECISION says")
    assert choose("fp32", fixed)[0] == "fp32"
    with pytest.raises(ValueError, match="SENTDISC_PRECISION must be fp32 or bf16"):
        Hardware.detect("cpu", environ={"SENTDISC_PRECISION": "fast"})
    # featurize's own decision is this one, on given hardware or on this machine's
    assert feature_precision("auto", "cpu", AVX2) == "fp32"
    assert feature_precision("auto", "cpu", ZEN4) == "bf16"
    monkeypatch.delenv("SENTDISC_PRECISION", raising=False)
    assert feature_precision("auto", "cpu") == choose("auto", hw)[0]
    assert TrainConfig().precision == "auto"
    from sentdisc.recipes.score import ScoreConfig
    from sentdisc.serving import AppArgs
    from sentdisc.transfer import TransferConfig

    assert ScoreConfig().precision == AppArgs(checkpoint="x").precision == \
        TransferConfig().precision == "auto"
    with pytest.raises(ValueError, match="fp16 needs use_gpu"):
        TrainConfig(precision="fp16")


def test_bf16_features_agree_with_fp32():
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(embed_size=16, rnn_size=64))
    texts = ["a fine film", "not good at all, I want my money back", "meh"] * 4
    for kind in ("cell", "mean"):
        fp32 = featurize(model, texts, kind=kind, precision="fp32")
        bf16 = featurize(model, texts, kind=kind, precision="bf16")
        assert np.abs(fp32 - bf16).max() < 2e-2 and not np.array_equal(fp32, bf16)


def test_bf16_training_loss_tracks_fp32():
    """The same run, weights and windows, in fp32 and with bf16 products: the losses stay
    within 2% of each other over 60 steps (benchmarks/bench_model.py runs longer)."""
    text = ("the movie was great and the acting was good but the plot was thin. " * 40).encode()
    data = torch.tensor(np.frombuffer(text, np.uint8).astype(np.int64))
    curves = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = ByteLM(ModelConfig(embed_size=16, rnn_size=64))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        autocast, hidden, losses = autocast_for(precision, torch.device("cpu")), None, []
        starts = np.random.default_rng(1).integers(0, len(data) - 33, (60, 8))
        for step in range(60):
            x = torch.stack([data[s:s + 33] for s in starts[step]])
            reset = torch.zeros(8, 32, dtype=torch.bool)
            reset[:, 0] = True
            loss, hidden = train_step(model, opt, x, reset, None, clip=1.0, autocast=autocast)
            losses.append(loss.item())
        curves[precision] = np.array(losses)
    assert curves["fp32"][-10:].mean() < 0.7 * curves["fp32"][:5].mean()  # it learns
    rel = np.abs(curves["bf16"] - curves["fp32"]) / curves["fp32"]
    assert rel.max() < 0.02, rel.max()


PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "linear", "matmul"}  # aten's matrix products


def _weight_shapes(model) -> set:
    """Every parameter's shape and its transpose's (a product may take either)."""
    shapes = {tuple(p.shape) for p in model.parameters()}
    return shapes | {s[::-1] for s in shapes}


def _bf16_step_ops(model, T: int, B: int = 3) -> list:
    """The ops of one bf16 training step (after a warm-up step) over B x T bytes."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    autocast = autocast_for("bf16", torch.device("cpu"))
    x = torch.randint(0, 256, (B, T + 1), generator=torch.Generator().manual_seed(T))
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    train_step(model, opt, x, reset, None, clip=1.0, autocast=autocast)
    with OpLog() as log:
        train_step(model, opt, x, reset, None, clip=1.0, autocast=autocast)
    return log.ops


def test_bf16_step_multiplies_in_bf16_and_casts_weights_once_per_step():
    """The bf16 CPU path's structure, held on any CPU (native bf16 or not): every product
    over the step's B*T rows runs on bf16 operands, forward and backward; the fp32 products
    left are the per-byte-value tables' (V rows, however long the window); the weights are
    cast to bf16 once per optimizer step, not per time step. Two window lengths tell per-step
    work (grows with T) from per-optimizer-step work (does not)."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(embed_size=16, rnn_size=64))
    weights = _weight_shapes(model)
    runs = {T: _bf16_step_ops(model, T) for T in (16, 32)}
    for T, ops in runs.items():
        rows = {3 * T}  # B*T: the window's rows, as no weight has (B = 3)
        fp32 = [(n, s) for n, d, s, _ in ops if n in PRODUCTS and torch.float32 in d]
        over_rows = [(n, s) for n, s in fp32 if rows & {dim for shape in s for dim in shape}]
        assert fp32 and not over_rows, f"fp32 products over the window's rows: {over_rows}"
        assert sum(n in PRODUCTS and d and set(d) == {torch.bfloat16}
                   for n, d, _, _ in ops) > T, "the recurrent products are not in bf16"
    fp32_products = [sorted((s for n, d, s, _ in runs[T] if n in PRODUCTS
                             and torch.float32 in d), key=str) for T in runs]
    assert fp32_products[0] == fp32_products[1], "fp32 products that grow with the window"
    weight_casts = [sorted((s[0] for n, d, s, out in runs[T]
                            if n in ("to", "_to_copy") and out == torch.bfloat16
                            and s[0] in weights),
                           key=str) for T in runs]
    assert weight_casts[0] == weight_casts[1], "weights cast per time step, not per step"
    assert 0 < len(weight_casts[0]) <= 2 * len(list(model.parameters()))


def test_bf16_featurize_multiplies_in_bf16_and_casts_weights_once_per_call():
    """Featurizing with bf16 products: the per-step products run on bf16 operands (the fp32
    ones are mean pooling's batched sums) and the weights are cast once per call, however many
    chunks the texts take (the kernel keeps the cast weights in the weights dict's cache)."""
    torch.manual_seed(0)
    model = ByteLM(ModelConfig(embed_size=16, rnn_size=64))
    weights = _weight_shapes(model)
    casts = {}
    for chunks in (2, 6):
        texts = ["a fine film " * (chunks * 32 // 12 + 1), "meh"]
        with OpLog() as log:
            featurize(model, texts, kind="mean", precision="bf16", chunk_size=32)
        dtypes = [set(d) for n, d, _, _ in log.ops if n in PRODUCTS]
        assert sum(d == {torch.bfloat16} for d in dtypes) >= chunks * 32
        pooled = [n for n, d, _, _ in log.ops if n in PRODUCTS and torch.float32 in d]
        assert set(pooled) <= {"bmm"}, pooled  # mean pooling's, per chunk
        casts[chunks] = sorted((s[0] for n, d, s, out in log.ops if n in ("to", "_to_copy")
                                and out == torch.bfloat16 and d == (torch.float32,)
                                and s[0] in weights), key=str)
    assert casts[2] and casts[2] == casts[6], casts


@pytest.mark.parametrize("asked, cpus, want", [(0, 2, 1), (0, 4, 2), (0, 16, 2), (3, 8, 3)])
def test_score_replicas_fit_the_cluster(asked, cpus, want):
    chosen, why = fit_replicas(asked, 1, cpus)
    assert chosen == want and ("fits the cluster" in why if asked == 0 else "as asked" in why)


def test_score_replicas_that_cannot_fit_say_why():
    from sentdisc.errors import InputError

    with pytest.raises(InputError, match="--replicas 2 x --cpus_per_replica 1 needs 3 CPUs"):
        fit_replicas(2, 1, 2)
    with pytest.raises(InputError, match="--cpus_per_replica 2 needs 3 CPUs"):
        fit_replicas(0, 2, 2)
