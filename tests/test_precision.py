"""precision auto: the one decision (pure, for any hardware), what this machine decides, and
bf16 against fp32 where it is asked for: features, and a training run's losses."""
import numpy as np
import pytest
import torch

from sentdisc import ByteLM, ModelConfig, featurize
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
