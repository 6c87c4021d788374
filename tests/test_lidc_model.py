"""CIMD network, training pieces, ensemble inferer (MONAI Label contract, seeds) and the DICOM clinical path."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import DiffusionModelUNet
from PIL import Image

from meddiff.cimd import CIMDLoss, CIMDTrainingInferer
from meddiff.dicom import read_series
from meddiff.engines import CIMDPrepareBatch
from meddiff.ensembles import DicomNoduleEnsembles
from meddiff.inferers import EnsembleSamplingInferer
from meddiff.io import OutputExistsError
from meddiff.networks import AxisAlignedConvGaussian, CIMDNetwork
from meddiff.schedulers import DDPMScheduler

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "lidc_ambiguous_segmentation"


def tiny_network(latent_dim: int = 3, design: str = "paper") -> CIMDNetwork:
    torch.manual_seed(0)
    denoiser = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=2 + (latent_dim if design == "cvae" else 0),
        out_channels=1,
        channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=1,
        num_head_channels=16,
        norm_num_groups=8,
    )
    for p in denoiser.parameters():  # MONAI starts some convolutions at zero: give the untrained net an output
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    prior = AxisAlignedConvGaussian(2, 1 if design == "cvae" else 2, latent_dim, channels=(4, 8), convs_per_block=1)
    posterior = AxisAlignedConvGaussian(2, 2, latent_dim, channels=(4, 8), convs_per_block=1)
    return CIMDNetwork(denoiser, prior, posterior, design=design)


def test_network_channel_checks():
    net = tiny_network()
    with pytest.raises(ValueError, match="in_channels=2 but needs 7"):
        CIMDNetwork(net.denoiser, AxisAlignedConvGaussian(2, 1, 5), AxisAlignedConvGaussian(2, 2, 5), design="cvae")
    with pytest.raises(ValueError, match="prior needs in_channels=2"):
        CIMDNetwork(net.denoiser, AxisAlignedConvGaussian(2, 1, 3), net.posterior)
    with pytest.raises(ValueError, match="design must be one of"):
        CIMDNetwork(net.denoiser, net.prior, net.posterior, design="latent")
    with pytest.raises(ValueError, match="needs `alpha_bar`"):
        x = torch.zeros(1, 1, 16, 16)
        net(x, torch.zeros(1, dtype=torch.long), x, mask=x)
    with pytest.raises(ValueError, match="needs `latent`"):
        tiny_network(design="cvae")(x, torch.zeros(1, dtype=torch.long), x)


def _training_step(net: CIMDNetwork, free_bits: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    for encoder in (net.prior, net.posterior):  # leave the zero start, where KL and its gradient vanish
        torch.nn.init.normal_(encoder.head.conv.weight, std=0.5)
    torch.manual_seed(1)
    image = torch.randn(2, 1, 16, 16)
    mask = torch.where(torch.rand(2, 1, 16, 16) > 0.7, 1.0, -1.0)
    inputs, target, args, kwargs = CIMDPrepareBatch(num_train_timesteps=1000)({"image": image, "label": mask}, "cpu")
    assert torch.equal(inputs, mask) and torch.equal(kwargs["condition"], image)
    assert torch.equal(target, kwargs["noise"])
    prediction = CIMDTrainingInferer(DDPMScheduler(1000))(inputs, net, *args, **kwargs)
    return *prediction, CIMDLoss(kl_weight=1.0, free_bits=free_bits)(prediction, target) - torch.nn.functional.mse_loss(
        prediction[0], target
    )


def test_paper_design_has_no_latent_input_and_trains_both_encoders():
    """The bundle's default is CIMD as the paper draws it (Fig. 1C): no z into the denoiser, both encoders trained."""
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "train.json")
    assert parser["cimd_design"] == "paper"
    parser.update({"network_channels": [8, 16], "attention_levels": [False, True], "num_head_channels": 16})
    parser.update({"norm_num_groups": 8, "encoder_channels": [4, 8]})
    bundle_net = parser.get_parsed_content("network_def")
    assert bundle_net.design == "paper" and bundle_net.denoiser.in_channels == 2  # noisy mask + image, no latent
    assert bundle_net.prior.in_channels == 2  # image + the model's current estimate of the mask

    net = tiny_network()
    eps, kl, kl_term = _training_step(net)
    assert kl.shape == (2, 3) and (kl >= 0).all() and kl.sum() > 0
    # the KL reaches every part: both encoders, and the denoiser through the estimate x̂_0 the prior sees
    kl_term.backward(retain_graph=True)
    for module in (net.prior, net.posterior, net.denoiser):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    x, t, image = torch.randn(2, 1, 16, 16), torch.tensor([10, 500]), torch.randn(2, 1, 16, 16)
    with torch.no_grad():  # sampling: the denoiser needs nothing but x_t and the image
        assert torch.equal(net(x, t, image)[0], net.denoise(x, t, image))


def test_free_bits_loss_by_hand():
    net = tiny_network()
    eps, kl, kl_term = _training_step(net, free_bits=0.5)
    per_dim = kl.mean(dim=0)
    assert kl_term.item() == pytest.approx(torch.clamp(per_dim, min=0.5).sum().item(), rel=1e-5)
    assert kl_term.item() >= 3 * 0.5 - 1e-6


def test_cvae_variant_injects_the_latent_and_reports_collapse():
    net = tiny_network(design="cvae")
    x, image, t = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        a = net(x, t, image, latent=torch.zeros(2, 3))[0]
        b = net(x, t, image, latent=torch.ones(2, 3))[0]
    assert not torch.allclose(a, b)  # z reaches the denoiser
    eps, kl, kl_term = _training_step(net)
    kl_term.backward()
    assert all(
        any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()) for m in (net.prior, net.posterior)
    )
    collapsed = tiny_network(design="cvae")  # zero-initialised heads: q = p = N(0, I), z carries nothing
    mask = torch.where(torch.rand(2, 1, 16, 16) > 0.7, 1.0, -1.0)
    found = collapsed.diagnostics(x, t, image, mask, torch.randn_like(x), torch.tensor([0.99, 0.5]))
    assert found["kl_total"] == pytest.approx(0.0, abs=1e-6) and len(found["kl_per_dim"]) == 3
    assert {"mse_posterior", "mse_prior", "gap"} <= set(found)
    assert "gap" not in tiny_network().diagnostics(x, t, image, mask, torch.randn_like(x), torch.tensor([0.99, 0.5]))


def test_diagnostics_report_every_interval_and_after_the_last_iteration_once(caplog):
    from ignite.engine import Engine

    from meddiff.cimd import CIMDDiagnostics

    net = tiny_network()
    batch = {"image": torch.randn(2, 1, 16, 16), "label": torch.where(torch.rand(2, 1, 16, 16) > 0.7, 1.0, -1.0)}
    seen = []
    for epochs in (2, 3):  # 4 iterations (the last a multiple of the interval) and 6 (not one)
        engine = Engine(lambda engine, b: None)
        engine.network = net
        CIMDDiagnostics(DDPMScheduler(num_train_timesteps=10), interval=4).attach(engine)
        with caplog.at_level("INFO", logger="meddiff.cimd"):
            caplog.clear()
            engine.run([batch, batch], max_epochs=epochs)
        seen.append([r.getMessage().split(":")[0] for r in caplog.records if r.name == "meddiff.cimd"])
    assert seen == [["iteration 4"], ["iteration 4", "iteration 6"]]


def test_ensemble_default_is_stochastic():
    """Two members started from the same x_T differ under the bundle's default sampler (and not under DDIM)."""
    from meddiff.sampling import sample
    from meddiff.schedulers import make_scheduler

    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.json")
    sampler, steps = parser["sampler"], parser["num_inference_steps"]
    net = tiny_network().eval()
    image = torch.randn(1, 1, 16, 16).repeat(2, 1, 1, 1)
    x_t = torch.randn(1, 1, 16, 16).repeat(2, 1, 1, 1)

    def members(name: str) -> torch.Tensor:
        with torch.no_grad():
            return sample(lambda x, t: net.denoise(x, t, image), make_scheduler(name, steps), noise=x_t.clone(),
                          generator=torch.Generator().manual_seed(0))  # fmt: skip

    default = members(sampler)
    assert not torch.allclose(default[0], default[1])
    ddim = members("ddim")
    assert torch.allclose(ddim[0], ddim[1])


def test_inferer_outputs_and_seeds():
    net = tiny_network()
    image = torch.rand(2, 1, 16, 16) * 2 - 1
    inferer = EnsembleSamplingInferer(num_samples=3, sampler="ddim", num_inference_steps=3, seed=7, output="samples")
    samples = inferer(image, net)
    assert samples.shape == (2, 3, 16, 16) and set(samples.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(samples, inferer(image, net))  # DDIM with a fixed seed is deterministic
    assert not torch.equal(samples, inferer(image, net, seed=8))
    frequency = inferer(image, net, output="frequency")
    assert frequency.shape == (2, 1, 16, 16) and torch.allclose(frequency, samples.mean(1, keepdim=True))
    assert torch.equal(inferer(image, net, output="majority"), (frequency > 0.5).float())
    ddpm = EnsembleSamplingInferer(num_samples=2, sampler="ddpm", num_inference_steps=4, seed=1, output="samples")
    assert ddpm(image[:1], net).shape == (1, 2, 16, 16)
    bf16 = EnsembleSamplingInferer(num_samples=2, num_inference_steps=2, precision="bf16", channels_last=True)
    assert bf16(image[:1], net).dtype == torch.float32
    with pytest.raises(ValueError, match="output must be"):
        EnsembleSamplingInferer(output="mean")


def test_monai_label_contract(tmp_path):
    """MONAI Label's bundle loader: preprocessing from configs, then inferer(inputs[None], network) -> pred."""
    parser = ConfigParser()
    parser.read_config([BUNDLE / "configs" / "inference.json", BUNDLE / "configs" / "demo.json"])
    parser.read_meta(BUNDLE / "configs" / "metadata.json")
    parser.update({"bundle_root": str(tmp_path), "num_samples": 2, "num_inference_steps": 2, "progress": False})
    meta = parser.get("_meta_")["network_data_format"]
    assert next(iter(meta["inputs"])) == "image" and next(iter(meta["outputs"])) == "pred"
    crop = np.zeros((40, 48), np.uint8)
    crop[10:20, 30:40] = 200  # a non-square image: rows must stay rows (no PIL transposition)
    Image.fromarray(crop).save(tmp_path / "crop.png")
    data = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "crop.png")})
    assert data["image"].shape == (1, 32, 32) and float(data["image"].max()) <= 1.0
    assert data["image"][0, 10, 25] > data["image"][0, 25, 10]
    network = parser.get_parsed_content("network_def")
    with torch.no_grad():
        members = parser.get_parsed_content("inferer")(data["image"][None], network)
    assert members.shape == (1, 2, 32, 32) and set(members.unique().tolist()) <= {0.0, 1.0}
    out = parser.get_parsed_content("postprocessing")({"image": data["image"], "pred": members[0]})
    # the frequency map of 2 members on the crop's own grid, in MONAI's (X, Y) order, 8-bit for a PNG crop
    assert out["pred"].shape == (48, 40) and out["pred"].dtype == torch.uint8
    assert set(out["pred"].unique().tolist()) <= {0, 128, 255}


def test_dicom_clinical_path(tmp_path):
    from dicom_helpers import write_series

    pixels = np.full((5, 40, 44), 200, np.int16)  # -824 HU: lung
    pixels[2, 15:22, 18:26] = 1064  # +40 HU: a nodule on slice 2
    uid = write_series(tmp_path / "ct", pixels, spacing=(0.7, 0.7, 2.5), origin=(-15.0, -14.0, 100.0))
    image = read_series(tmp_path / "ct")  # the geometry reference
    patient = image.TransformContinuousIndexToPhysicalPoint((21.5, 18.0, 2.0))
    inferer = EnsembleSamplingInferer(num_samples=3, num_inference_steps=2, seed=3)
    out = tmp_path / "out"
    segmenter = DicomNoduleEnsembles(
        tiny_network(), inferer, str(tmp_path / "ct"), [[21.5, 18.0, 2]], str(out),
        img_size=16, crop_size=24, crop_spacing_mm=0.5, centre_space="voxel", frequency_thresholds=[0.3, 0.6],
    )  # fmt: skip
    with pytest.raises(ValueError, match="outside the series"):
        DicomNoduleEnsembles(tiny_network(), inferer, str(tmp_path / "ct"), [[0, 0, 9]], str(out)).run()
    records = segmenter.run()
    assert records[0]["index"] == [21.5, 18.0, 2]
    majority = sitk.ReadImage(str(out / "nodule_00" / "majority.nii.gz"))
    frequency = sitk.ReadImage(str(out / "nodule_00" / "frequency.nii.gz"))
    for written in (majority, frequency):
        assert written.GetSize() == (44, 40, 5)
        assert np.allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-3)
        assert np.allclose(written.GetSpacing(), image.GetSpacing(), atol=1e-4)
    freq = sitk.GetArrayFromImage(frequency)
    assert freq.min() >= 0 and freq.max() <= 1 and not freq[[0, 1, 3, 4]].any()
    assert set(np.unique(np.round(freq * 3, 4))) <= {0.0, 1.0, 2.0, 3.0}
    samples = sitk.ReadImage(str(out / "nodule_00" / "samples.nii.gz"))
    assert samples.GetDimension() == 4 and samples.GetSize() == (44, 40, 1, 3)
    # footprint: 24 px at 0.5 mm = 12 mm = about 17 px at 0.7 mm around the centre
    nonzero_cols = np.nonzero(sitk.GetArrayFromImage(samples).any(axis=(0, 1, 2)))[0]
    assert nonzero_cols.size == 0 or (nonzero_cols.min() >= 21.5 - 9.5 and nonzero_cols.max() <= 21.5 + 9.5)
    seg = pydicom.dcmread(out / "nodule_00" / "seg.dcm")
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["majority", "frequency >= 0.3", "frequency >= 0.6"]
    seg_hd = hd.seg.segread(out / "nodule_00" / "seg.dcm")
    assert seg_hd.number_of_segments == 3
    assert seg_hd.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Nodule"
    with pytest.raises(OutputExistsError):
        segmenter.run()  # never overwrites, and fails before sampling
    # patient coordinates (LPS mm) land on the same voxel
    segmenter_mm = DicomNoduleEnsembles(
        tiny_network(), inferer, str(tmp_path / "ct"), [list(patient)], str(tmp_path / "out_mm"),
        img_size=16, crop_size=24, centre_space="patient",
    )  # fmt: skip
    assert np.allclose(segmenter_mm.run()[0]["index"], [21.5, 18.0, 2], atol=1e-3)
