"""attention="auto": which path the user cross-attention takes on each device.

The rule is checked through `resolve_attention` with device arguments (a CUDA device object needs
no GPU), and through a processor on the CPU with the device list emptied, so the processor is shown
to consult the rule rather than the mode string."""
import pytest
import torch

from ppd_engine.adapters import add_user_adapters, call_model, user_conditioning
from ppd_engine.adapters import attention as attn_mod
from ppd_engine.adapters.attention import ATTENTION_MODES, resolve_attention
from ppd_engine.testing.tiny_unets import tiny_batch, tiny_unet


# ids without the word "cuda": conftest skips tests whose keywords contain it, and these need no GPU.
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)], ids=["str", "str-index", "device"])
def test_auto_is_sdpa_on_cuda(device):
    # Until a recorded GPU run shows the fused CUDA kernel faster than two SDPA calls.
    assert resolve_attention("auto", device) == "sdpa"


def test_auto_is_fused_on_cpu_and_explicit_modes_are_kept():
    assert resolve_attention("auto", "cpu") == "fused"
    assert resolve_attention("auto", torch.device("cpu")) == "fused"
    assert resolve_attention("auto", "meta") == "sdpa"  # any device not measured: the stock path
    for device in ("cpu", "cuda"):
        assert resolve_attention("sdpa", device) == "sdpa"
        assert resolve_attention("fused", device) == "fused"
    assert set(ATTENTION_MODES) == {"sdpa", "fused", "auto"}
    with pytest.raises(ValueError, match="expected one of"):
        resolve_attention("flash", "cpu")


def test_processor_follows_the_rule(monkeypatch):
    """With CPU taken out of the auto list (as CUDA is), an auto model runs no fused op; fused still does."""
    dual_mod = pytest.importorskip("ppd_engine.ops.dual_attention")
    calls = []
    real = dual_mod.dual_cross_attention
    monkeypatch.setattr(dual_mod, "dual_cross_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_unet("sd15")
    add_user_adapters(model, user_dim=24, attention="auto")
    batch = tiny_batch(model, 2, generator=torch.Generator().manual_seed(0))
    users = torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(1))

    def run():
        with torch.no_grad(), user_conditioning(model, users, torch.tensor([1.0, 0.5])):
            call_model(model, batch["noisy_latents"], batch["timesteps"], batch["encoder_hidden_states"],
                       **batch["kwargs"])

    if not dual_mod.dual_attention_supported(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8),
                                             torch.zeros(1, 1, 1, 8)):
        pytest.skip("no CPU kernel of ppd::dual_cross_attention (extension not built)")
    run()
    assert calls, "auto on the CPU takes the fused op"
    calls.clear()
    monkeypatch.setattr(attn_mod, "AUTO_FUSED_DEVICE_TYPES", frozenset())
    run()
    assert not calls, "auto where the fused op is not the measured choice runs SDPA"
