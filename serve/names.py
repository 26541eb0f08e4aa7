"""AUTOMATIC1111's sampler and scheduler names and what they are in latentloom."""
from __future__ import annotations

from dataclasses import dataclass

from latentloom.pipelines.infotext import A1111_SAMPLERS


@dataclass(frozen=True)
class SamplerName:
    name: str  # A1111's display name
    aliases: tuple[str, ...]
    sampler: str  # latentloom's


# A1111's aliases (sd_samplers_kdiffusion / sd_samplers_timesteps) for the solvers latentloom has, in the order
# /sdapi/v1/samplers lists them; the display names are the infotext's (pipelines.infotext.A1111_SAMPLERS), and
# latentloom's own names are accepted too
_ALIASES = {
    "dpmpp_2m": ("k_dpmpp_2m",), "dpmpp_2m_sde": ("k_dpmpp_2m_sde",), "euler_a": ("k_euler_a", "k_euler_ancestral"),
    "euler": ("k_euler",), "heun": ("k_heun",), "ddim": ("ddim",), "ddpm": ("ddpm",), "unipc": ("unipc",),
    "lcm": ("k_lcm", "lcm"), "tcd": ("tcd",),
}
SAMPLER_NAMES = tuple(SamplerName(A1111_SAMPLERS[sampler], aliases, sampler) for sampler, aliases in _ALIASES.items())

# A1111 scheduler name -> (label, karras_sigmas): "automatic" keeps the model's own sigma spacing
SCHEDULERS = {"automatic": ("Automatic", None), "karras": ("Karras", True)}


def _key(text: str) -> str:
    return " ".join(text.lower().split())


_LOOKUP = {}
for _entry in SAMPLER_NAMES:
    for _text in (_entry.name, *_entry.aliases, _entry.sampler):
        _LOOKUP[_key(_text)] = _entry


def accepted_samplers() -> list[str]:
    return [s.name for s in SAMPLER_NAMES]


def resolve_sampler(name: str) -> tuple[SamplerName, str | None]:
    """An A1111 sampler name or alias -> (its entry, the scheduler its name implies: A1111 before 1.9 wrote
    "DPM++ 2M Karras" for sampler "DPM++ 2M" with scheduler "karras"); LookupError names the accepted ones."""
    key = _key(name)
    if key in _LOOKUP:
        return _LOOKUP[key], None
    base, _, last = key.rpartition(" ")
    if last == "karras" and base in _LOOKUP:
        return _LOOKUP[base], "karras"
    raise LookupError(f"unknown sampler_name {name!r}; this server has {', '.join(accepted_samplers())} "
                      f"(aliases: k_dpmpp_2m, k_euler_a, ...; a ' Karras' suffix selects the Karras scheduler)")


def resolve_scheduler(name: str) -> bool | None:
    """An A1111 scheduler name or label -> latentloom's karras_sigmas; LookupError names the accepted ones."""
    key = _key(name)
    for scheduler, (label, karras) in SCHEDULERS.items():
        if key in (scheduler, label.lower()):
            return karras
    raise LookupError(f"unknown scheduler {name!r}; this server has {', '.join(l for l, _ in SCHEDULERS.values())}")


def samplers_listing() -> list[dict]:
    """A1111's /sdapi/v1/samplers."""
    return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in SAMPLER_NAMES]


def schedulers_listing() -> list[dict]:
    """A1111's /sdapi/v1/schedulers."""
    return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if karras else -1.0,
             "need_inner_model": False} for name, (label, karras) in SCHEDULERS.items()]


def a1111_sampler_name(sampler: str) -> str:
    """latentloom's sampler name -> A1111's display name (for echoing recipes)."""
    return A1111_SAMPLERS.get(sampler, sampler)
