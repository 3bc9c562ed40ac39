"""The channels-last memory layout of the convolution paths (msf.channels_last) changes how tensors are stored, not
what is computed: the VAE and the CNN encoder give the same outputs and gradients as with the plain NCHW layout."""

import pytest
import torch

import model as models
import msf


def nchw(monkeypatch):
    """The code as it was before the layout change: channels_last leaves every tensor as it is."""
    monkeypatch.setattr(msf, "channels_last", lambda x: x)


def vae_outputs(config: dict, images: torch.Tensor) -> dict:
    torch.manual_seed(0)
    vae = msf.build_vae(config)
    loss, stats, quantized, reconstructions = vae(images, return_reconstructions=True)
    loss.backward()
    vae.eval()
    guidance = vae.guidance(images)
    return {"loss": loss.detach(), "reconstructions": [r.detach() for r in reconstructions],
            "indices": quantized.indices, "guidance": guidance["vectors"][0], "guidance_indices": guidance["indices"][0],
            "decoded": vae.decode(guidance["vectors"][0]),
            "grads": {name: p.grad.clone() for name, p in vae.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("overrides", [{"quantizer": "msf", "fusion": "concat_pinv"}, {"quantizer": "msf", "fusion": "mean"},
                                       {"quantizer": "vq"}, {"quantizer": "grouped"}])
def test_vae_matches_the_nchw_path(monkeypatch, overrides):
    config = {"code_dim": 16, "vae_width": 8, "codebook_size": 64, "vae_norm": "batch", "gumbel": False, **overrides}
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    now = vae_outputs(config, images)
    with monkeypatch.context() as patch:
        nchw(patch)
        before = vae_outputs(config, images)
    torch.testing.assert_close(now["loss"], before["loss"], rtol=1e-5, atol=1e-6)
    for a, b in zip(now["reconstructions"], before["reconstructions"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # summation order differs
    for a, b in zip(now["indices"], before["indices"]):
        assert torch.equal(a, b)
    assert torch.equal(now["guidance_indices"], before["guidance_indices"])
    torch.testing.assert_close(now["guidance"], before["guidance"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(now["decoded"], before["decoded"], rtol=1e-4, atol=1e-4)
    assert now["grads"].keys() == before["grads"].keys()
    for name in now["grads"]:
        torch.testing.assert_close(now["grads"][name], before["grads"][name], rtol=1e-3, atol=1e-5, msg=name)


def test_guidance_is_the_codes_exactly():
    """The guidance of an image is a function of its code indices alone: with no gradient recorded the decoder input
    is the combined codes themselves (no z + (q - z) rounding), so equal codes give bit-equal vectors."""
    torch.manual_seed(0)
    vae = msf.build_vae({"code_dim": 16, "vae_width": 8, "codebook_size": 64, "fusion": "concat_pinv"}).eval()
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    guidance = vae.guidance(images)
    q = vae.quantizer
    ids = guidance["indices"][0]
    expected = q.project.down(torch.cat([q.si.codes()[ids[..., 0]], q._sv_codebook(0).codes()[ids[..., 1]]], -1))
    assert torch.equal(guidance["vectors"][0], expected)


def test_cnn_encoder_matches_the_nchw_path(monkeypatch):
    torch.manual_seed(0)
    encoder = models.FeatureEncoder({"encoder": "cnn", "cnn_channels": 8, "slot_dim": 16, "encoder_stride": 2})
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    results = []
    for layout in ("channels_last", "nchw"):
        with monkeypatch.context() as patch:
            if layout == "nchw":
                nchw(patch)
            encoder.zero_grad()
            tokens, grid = encoder(images)
            tokens.square().sum().backward()
            results.append((tokens.detach(), grid, [p.grad.clone() for p in encoder.parameters()]))
    (a, grid_a, grads_a), (b, grid_b, grads_b) = results
    assert grid_a == grid_b
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
