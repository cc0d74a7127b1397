import pytest
import torch

from model import ARCHS, ConvAutoencoder, ModelConfig, masked_errors, masked_mse


def test_parameter_count_matches_specification():
    assert sum(p.numel() for p in ConvAutoencoder().parameters()) == 777_987


@pytest.mark.parametrize(  # 30 s, 70 s, 90 s at 100 Hz; "pad" repeats at least one bin, 48 -> 64
    "size_fit, n_time, latent_time",
    [("pad", 48, 4), ("pad", 111, 7), ("pad", 142, 9), ("interpolate", 48, 3), ("interpolate", 111, 7)],
)
def test_latent_and_output_shapes(size_fit, n_time, latent_time):
    model = ConvAutoencoder(ModelConfig(size_fit=size_fit)).eval()
    x = torch.rand(2, 3, 129, n_time)
    assert model.encode(x).shape == (2, 256, 9, latent_time)
    assert model(x).shape == x.shape


@pytest.mark.parametrize(
    "arch, parameters, latent",
    [("seed", 777_987, (256, 9, 9)), ("stride8", 187_011, (128, 17, 18)), ("wide", 3_104_259, (512, 9, 9))],
)
def test_each_arch_keeps_the_input_size_at_its_own_latent_resolution(arch, parameters, latent):
    """A 90 s recording (129, 142): "pad" fits it to the arch's stride (16: 144 x 144; 8: 136 x 144)."""
    model = ConvAutoencoder(ModelConfig(features=ARCHS[arch])).eval()
    x = torch.rand(2, 3, 129, 142)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.encode(x).shape == (2, *latent) and model(x).shape == x.shape


def trained_a_little(config):
    """A model whose BatchNorm running statistics moved off their initial values, in eval mode."""
    torch.manual_seed(0)
    model = ConvAutoencoder(config)
    model(torch.rand(4, 3, 129, 64))
    return model.eval()


def test_padded_fit_reconstructs_a_bin_the_same_whatever_the_length():
    """With "pad" the first bins of a recording come out the same from 300 or 400 bins (beyond the receptive field
    of the end, every bin sits on the same grid); "interpolate" stretches 304 to 300 bins and moves them."""
    x = torch.rand(1, 3, 129, 400)
    for size_fit, same in (("pad", True), ("interpolate", False)):
        model = trained_a_little(ModelConfig(size_fit=size_fit))
        with torch.no_grad():
            short, long = model(x[..., :300]), model(x)
        assert torch.allclose(short[..., :100], long[..., :100], atol=1e-5) == same
        assert short.shape == x[..., :300].shape


def test_padded_fit_never_keeps_the_decoders_last_column():
    """A length that is a multiple of 16 is padded like one bin longer with its last bin repeated: the same layers'
    input, so the same output (without the repeat, its last bin would come from the decoder's edge column, which
    training on other lengths never fits)."""
    model = trained_a_little(ModelConfig(size_fit="pad"))
    x = torch.rand(1, 3, 129, 96)
    repeated = torch.cat([x, x[..., -1:]], dim=-1)
    with torch.no_grad():
        assert model.encode(x).shape[-1] == 7
        assert torch.equal(model(x), model(repeated)[..., :96])


def test_model_config_round_trip_and_its_check():
    assert ModelConfig().size_fit == "pad"
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()
    with pytest.raises(ValueError, match="size_fit"):
        ModelConfig(size_fit="stretch")


def test_forward_backward_gives_gradients_everywhere():
    model = ConvAutoencoder()
    x = torch.rand(2, 3, 129, 111)
    masked_mse(model(x), x, torch.ones(2, 111, dtype=torch.bool)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_masked_mse_ignores_padded_bins():
    target, reconstruction = torch.rand(2, 3, 129, 50), torch.rand(2, 3, 129, 50)
    mask = torch.zeros(2, 50, dtype=torch.bool)
    mask[0, :50], mask[1, :30] = True, True
    garbage = reconstruction.clone()
    garbage[1, :, :, 30:] = 1e6  # padding must not count
    valid = torch.cat(
        [
            (reconstruction[0] - target[0]).pow(2).flatten(),
            (reconstruction[1, :, :, :30] - target[1, :, :, :30]).pow(2).flatten(),
        ]
    )
    assert masked_mse(garbage, target, mask).item() == pytest.approx(valid.mean().item(), rel=1e-5)


def test_masked_errors_per_sample_and_component():
    target, reconstruction = torch.rand(2, 3, 129, 40), torch.rand(2, 3, 129, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    mae = masked_errors(reconstruction, target, mask, power=1)
    assert mae.shape == (2, 3)
    expected = (reconstruction[1, 2, :, :25] - target[1, 2, :, :25]).abs().mean()
    assert mae[1, 2].item() == pytest.approx(expected.item(), rel=1e-5)
