"""Keys a scheduler_config.json leaves out take the swapped-in diffusers class's default.

The table in `latentloom.samplers.scheduler_defaults` is checked against the installed diffusers
classes' signatures, and `ScheduleConfig.for_sampler` against what diffusers' own
`Cls.from_config(pipe.scheduler.config)` builds from each published release config.
"""
import inspect
import json
import warnings
from dataclasses import fields

import diffusers
import pytest

from builders import DATA, DIFFUSERS_SCHEDULERS
from latentloom.samplers import SAMPLERS
from latentloom.samplers.scheduler_defaults import CLASS_DEFAULTS, DIFFUSERS_CLASS, NOT_ACCEPTED
from latentloom.samplers.schedules import RECIPE_KEYS, ScheduleConfig

RELEASES = DATA / "release_configs"
SCHEDULER_FILES = sorted(p for p in RELEASES.glob("*scheduler_config.json") if "low_res" not in p.name)
MODELLED = [f.name for f in fields(ScheduleConfig) if f.name != "stated"]
KARRAS = ("euler", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")  # classes with use_karras_sigmas


def test_every_sampler_has_a_diffusers_class():
    assert set(DIFFUSERS_CLASS) == set(SAMPLERS)


@pytest.mark.parametrize("cls_name", sorted(CLASS_DEFAULTS))
def test_table_equals_the_installed_diffusers_defaults(cls_name):
    """A diffusers upgrade that changes a default, or starts / stops accepting a key, fails here."""
    params = inspect.signature(getattr(diffusers, cls_name).__init__).parameters
    accepted = {k: params[k].default for k in MODELLED if k in params}
    assert CLASS_DEFAULTS[cls_name] == accepted


def test_keys_no_class_accepts_are_off():
    consistency_only = {"original_inference_steps": 50, "timestep_scaling": 10.0}  # read by lcm / tcd alone
    for key, value in NOT_ACCEPTED.items():
        assert key in MODELLED
        if key in consistency_only:
            assert value == consistency_only[key] == CLASS_DEFAULTS["LCMScheduler"][key]
        else:
            assert value in (False, True, 1.0)


def _release(path):
    data = json.loads(path.read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. a release's interpolation_type: neutral anyway
        return data, ScheduleConfig.from_diffusers_config(data)


def _diffusers_swap(data, sampler, **overrides):
    """The documented swap: load the file into its own class, then `Cls.from_config(that.config)`."""
    own = getattr(diffusers, data["_class_name"]).from_config(data)
    cls_name, extra = DIFFUSERS_SCHEDULERS[sampler]
    return getattr(diffusers, cls_name).from_config(own.config, **extra, **overrides)


def test_the_release_configs_are_here():
    names = {p.name for p in SCHEDULER_FILES}
    assert {"sd15-scheduler_config.json", "sd2-768-v-scheduler_config.json",
            "sdxl-base-1.0-scheduler_config.json"} <= names


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("path", SCHEDULER_FILES, ids=lambda p: p.name.removesuffix("-scheduler_config.json"))
def test_resolved_settings_equal_diffusers_swapped_scheduler(path, sampler):
    data, config = _release(path)
    swapped = _diffusers_swap(data, sampler)
    params = inspect.signature(type(swapped).__init__).parameters
    ours = config.for_sampler(sampler)
    for key in MODELLED:
        # diffusers keeps keys its class does not accept in .config (for later swaps); they do nothing
        expected = swapped.config[key] if key in params else NOT_ACCEPTED[key]
        assert getattr(ours, key) == expected, f"{path.name} {sampler}: {key}"


def test_sd15_spacing_follows_the_sampler():
    """The defect this rule fixes: SD 1.5 states no timestep_spacing, so Euler & co. use linspace."""
    _, config = _release(RELEASES / "sd15-scheduler_config.json")
    assert not config.is_stated("timestep_spacing")
    spacing = {s: config.for_sampler(s).timestep_spacing for s in SAMPLERS}
    assert spacing == {"ddpm": "leading", "ddim": "leading", "euler": "linspace", "euler_a": "linspace",
                       "heun": "linspace", "dpmpp_2m": "linspace", "dpmpp_2m_sde": "linspace", "unipc": "linspace",
                       "lcm": "leading", "tcd": "leading"}  # (lcm / tcd take their steps from the teacher's grid)
    assert config.for_sampler("ddim").steps_offset == 1  # stated: kept for every class


def test_left_out_keys_take_each_class_default():
    config = ScheduleConfig.from_diffusers_config({"prediction_type": "v_prediction"})
    ddim, heun, euler = (config.for_sampler(s) for s in ("ddim", "heun", "euler"))
    assert (ddim.beta_schedule, ddim.beta_start, ddim.beta_end) == ("linear", 0.0001, 0.02)
    assert (heun.beta_start, heun.beta_end) == (0.00085, 0.012)
    assert ddim.clip_sample and ddim.set_alpha_to_one and ddim.steps_offset == 0
    assert not heun.clip_sample and not euler.clip_sample
    assert all(c.prediction_type == "v_prediction" for c in (ddim, heun, euler))


def test_a_stated_key_applies_only_where_the_class_accepts_it():
    config = ScheduleConfig.from_diffusers_config({"use_karras_sigmas": True, "rescale_betas_zero_snr": True,
                                                   "clip_sample": True})
    assert config.for_sampler("euler").use_karras_sigmas
    assert not config.for_sampler("euler_a").use_karras_sigmas  # EulerAncestral has no Karras option
    assert not config.for_sampler("heun").rescale_betas_zero_snr  # nor Heun a zero-SNR rescale
    assert config.for_sampler("heun").clip_sample and not config.for_sampler("dpmpp_2m").clip_sample


def test_a_config_built_in_code_states_every_key():
    config = ScheduleConfig(timestep_spacing="trailing", steps_offset=0)
    assert config.for_sampler("euler").timestep_spacing == "trailing"
    assert config.for_sampler("ddim").steps_offset == 0


def test_with_settings_states_keys_and_names_unknown_ones():
    _, config = _release(RELEASES / "sd15-scheduler_config.json")
    over = config.with_settings({"timestep_spacing": "trailing"})
    assert over.is_stated("timestep_spacing") and over.for_sampler("euler").timestep_spacing == "trailing"
    with pytest.raises(ValueError, match="unknown scheduler settings.*timestep_spaceing"):
        config.with_settings({"timestep_spaceing": "trailing"})
    with pytest.raises(ValueError, match="timestep_spacing 'middle'"):
        config.with_settings({"timestep_spacing": "middle"})


def test_settings_round_trip_through_a_recipe():
    _, config = _release(RELEASES / "sd2-768-v-scheduler_config.json")
    for sampler in SAMPLERS:
        resolved = config.for_sampler(sampler)
        recorded = json.loads(json.dumps(resolved.settings()))
        assert set(recorded) == set(RECIPE_KEYS)
        replayed = config.with_settings(recorded).for_sampler(sampler)
        assert replayed == resolved


@pytest.mark.parametrize("name", ["default", "upscaler"])
def test_bundled_models_sample_as_before(name):
    """The bundled models state their keys, so every sampler resolves to what latentloom used before
    (the legacy fill-ins): `make demo` makes the same images."""
    from latentloom.weights import WEIGHTS_DIR

    data = json.loads((WEIGHTS_DIR / name / "scheduler" / "scheduler_config.json").read_text())
    config = ScheduleConfig.from_diffusers_config(data)
    for key in ("timestep_spacing", "steps_offset", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                "set_alpha_to_one", "clip_sample", "use_karras_sigmas"):
        assert key in data, f"the bundled {name} model leaves {key} to the sampler's class"
    legacy = config.with_settings(config.legacy_settings())
    for sampler in SAMPLERS:
        assert config.for_sampler(sampler) == legacy.for_sampler(sampler), sampler


def test_a_live_schedulers_config_counts_its_filled_in_keys_as_left_out():
    """diffusers marks the keys a class filled in (`_use_default_values`); from_config drops them."""
    data, _ = _release(RELEASES / "sd15-scheduler_config.json")
    live = diffusers.PNDMScheduler.from_config(data)
    assert "timestep_spacing" in live.config["_use_default_values"]
    config = ScheduleConfig.from_diffusers_config(dict(live.config))
    assert not config.is_stated("timestep_spacing") and config.is_stated("steps_offset")
    for sampler in SAMPLERS:
        swapped = _diffusers_swap(data, sampler)
        assert config.for_sampler(sampler).timestep_spacing == swapped.config.timestep_spacing, sampler
