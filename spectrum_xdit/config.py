"""Configuration of the Spectrum forecaster (docs/method.md: schedule, basis, fit and blend).

A pydantic model, so that every input (Python, the CLI's flags, an HTTP body, the Serve YAML,
xDiT's ``--cache_config`` JSON) is checked by these field definitions and nothing else; a bad
value raises ``pydantic.ValidationError`` (a ``ValueError``) whose ``loc`` names the field.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

AUTO = "auto"
# Upper bounds that no real run reaches, so that no setting can make the host math or the state
# unbounded: P = degree + 1 costs O(P^3) per solve and P feature-sized moments of memory.
MAX_STEPS = 10_000
MAX_DEGREE = 16
MAX_RIDGE_LAMBDA = 1e3
MAX_ERROR_BUDGET = 100.0   # a relative error of 100 accepts any forecast

# The budget schedule's defaults, for the fields a config leaves out: chosen by the protocol of
# benchmarks/defaults.py across models, samplers, shifts, guidance scales and step counts (the
# figures: benchmarks/README.md), so that ``target_nfe`` alone is the recommended setting. The
# other schedules keep the field defaults (the paper's, which the reference vectors are made with).
BUDGET_DEFAULTS = {"warmup_steps": 3, "blend_weight": AUTO, "reuse": True, "budget_tail": 0.2}
# With step_grid "auto", a target_nfe below this runs the plain sampler on a grid of target_nfe
# steps: there the protocol found forecasting losing to it (too few real steps to fit after the
# warm-up and the tail).
PLAIN_GRID_BELOW = 8


def _budget_needs_its_schedule(budget, schedule) -> None:
    """A budget (``target_nfe`` or ``speedup``) is the budget schedule's setting."""
    if budget is not None and schedule not in (None, "budget"):
        raise ValueError(f'sets a budget, which the "{schedule}" schedule has not: leave schedule out or set it '
                         'to "budget"')


class SpectrumConfig(BaseModel):
    """Settings of one Spectrum run; every field is checked when the object is built."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, validate_default=True)

    num_inference_steps: int = Field(50, ge=1, le=MAX_STEPS, description=(
        "number of denoising steps S of the sampler; the time axis of the fit is the step index "
        "mapped to tau = 2 s / S - 1"))
    warmup_steps: int = Field(5, ge=1, le=MAX_STEPS, description=(
        "the first W steps always run the block stack (at least one: a forecast needs history; the budget "
        f"schedule's default: {BUDGET_DEFAULTS['warmup_steps']})"))
    window_size: float = Field(2.0, ge=1, le=MAX_STEPS, allow_inf_nan=False, description=(
        "initial window N of the paper's schedule: after the warm-up a real step comes every floor(n) "
        "steps, n starting at N"))
    flex_window: float = Field(0.75, ge=0, le=MAX_STEPS, allow_inf_nan=False, description=(
        "growth alpha of the window after each real step (0: a fixed interval of N)"))
    degree: int = Field(4, ge=0, le=MAX_DEGREE, description="degree M of the Chebyshev basis T_0 .. T_M")
    ridge_lambda: float = Field(0.1, ge=0, le=MAX_RIDGE_LAMBDA, allow_inf_nan=False, description=(
        "ridge penalty lambda of the fit (0: the minimum-norm least-squares solution)"))
    blend_weight: Union[float, Literal["auto"]] = Field(0.5, description=(
        "weight w of the Chebyshev forecast in the blend with the local linear extrapolation of the "
        'last two real features (1: the paper\'s pure forecaster); "auto": at every forecast the weight '
        "that minimises the recent validation error (spectrum_xdit.control; the budget schedule's default: "
        f"{BUDGET_DEFAULTS['blend_weight']})"))
    schedule: Literal["paper", "adaptive", "budget"] = Field("paper", description=(
        '"paper": the fixed rule of window_size and flex_window; "adaptive": after each real step the '
        "next is the largest gap in [min_gap, max_gap] whose predicted error stays within error_budget; "
        '"budget": at most target_nfe real steps, placed where the validated error is highest (the '
        "default when target_nfe or speedup is given)"))
    speedup: Optional[float] = Field(None, ge=1, le=MAX_STEPS, allow_inf_nan=False, description=(
        "the budget schedule with target_nfe = round(num_inference_steps / speedup) (give this or target_nfe)"))
    target_nfe: Optional[int] = Field(None, ge=1, le=MAX_STEPS, description=(
        "the budget schedule: at most this many block-stack evaluations per guidance branch in a generation "
        "(a pipeline's experts share it by their number of steps)"))
    budget_tail: float = Field(BUDGET_DEFAULTS["budget_tail"], ge=0, le=1, allow_inf_nan=False, description=(
        "the budget schedule: the share of target_nfe spent on consecutive real steps at the end of the "
        "trajectory, where a forecast's error grows fastest (at least the final step)"))
    step_grid: Literal["request", "auto"] = Field("auto", description=(
        'the budget schedule: "request" forecasts on the request\'s num_inference_steps; "auto" instead runs '
        f"the plain sampler on a grid of target_nfe steps, every step real, when target_nfe is below "
        f"{PLAIN_GRID_BELOW}, where forecasting loses to it (the report gives the steps asked and run)"))
    error_budget: float = Field(0.05, ge=0, le=MAX_ERROR_BUDGET, allow_inf_nan=False, description=(
        "the largest relative L2 error of a forecast the adaptive schedule accepts (0 runs every step)"))
    min_gap: int = Field(1, ge=1, le=MAX_STEPS, description="smallest distance between two real steps of the adaptive schedule")
    max_gap: int = Field(8, ge=1, le=MAX_STEPS, description="largest distance between two real steps of the adaptive schedule")
    error_smoothing: float = Field(0.5, gt=0, le=1, allow_inf_nan=False, description=(
        "weight of the newest validation in the controller's exponentially weighted averages (1: the "
        "latest alone)"))

    reuse: bool = Field(False, description=(
        'with blend_weight "auto": also validate the last real feature (zero-order reuse) as a third '
        "predictor, and forecast with the affine combination of the three of least validation error"))

    @model_validator(mode="wrap")
    @classmethod
    def _schedule_defaults(cls, data, handler):
        """A budget (``target_nfe`` or ``speedup``) selects the budget schedule, and the budget
        schedule takes ``BUDGET_DEFAULTS`` for the fields not given; those stay out of
        ``model_fields_set``, which so holds only what the user set."""
        filled = set()
        if isinstance(data, dict):
            budget = data.get("target_nfe") is not None or data.get("speedup") is not None
            if "schedule" not in data and budget:
                data = {**data, "schedule": "budget"}
                filled.add("schedule")
            if data.get("schedule") == "budget":
                defaults = {name: value for name, value in BUDGET_DEFAULTS.items() if name not in data}
                if data.get("blend_weight", AUTO) != AUTO:   # reuse is a predictor of the auto blend alone
                    defaults.pop("reuse", None)
                data = {**data, **defaults}
                filled |= set(defaults)
        model = handler(data)
        model.__pydantic_fields_set__.difference_update(filled)
        return model

    @field_validator("blend_weight", mode="plain")
    @classmethod
    def _blend_weight(cls, value):
        if value == AUTO:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f'must be a number in [0, 1] or "auto", got {value!r}')
        return float(value)

    @field_validator("speedup")
    @classmethod
    def _speedup(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        _budget_needs_its_schedule(value, info.data.get("schedule"))
        return None if value is None else float(value)

    @field_validator("target_nfe")
    @classmethod
    def _target_nfe(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        schedule, speedup, steps = (info.data.get(name) for name in ("schedule", "speedup", "num_inference_steps"))
        if value is not None and speedup is not None:
            raise ValueError(f"give target_nfe or speedup, not both (got {value} and {speedup})")
        _budget_needs_its_schedule(value, schedule)
        if value is None and schedule == "budget" and "speedup" in info.data and speedup is None:
            raise ValueError('the "budget" schedule needs target_nfe or speedup')
        if value is not None and steps is not None and value > steps:
            raise ValueError(f"must be at most num_inference_steps {steps}, got {value}")
        return value

    @field_validator("reuse")
    @classmethod
    def _reuse(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("blend_weight", AUTO) != AUTO:
            raise ValueError(f'needs blend_weight "auto" (the weights come from validation), got blend_weight '
                             f'{info.data["blend_weight"]}')
        return value

    @field_validator("max_gap")
    @classmethod
    def _max_gap(cls, value: int, info: ValidationInfo) -> int:
        min_gap = info.data.get("min_gap")
        if min_gap is not None and value < min_gap:
            raise ValueError(f"must be at least min_gap {min_gap}, got {value}")
        return value

    @property
    def validates(self) -> bool:
        """Whether every real step is scored against the forecasts (auto blend or adaptive schedule)."""
        return self.blend_weight == AUTO or self.schedule != "paper"

    @property
    def nfe_budget(self) -> Optional[int]:
        """The budget schedule's most real steps per branch (``target_nfe``, or the steps over
        ``speedup``, at least 1); ``None`` for the other schedules."""
        if self.target_nfe is not None:
            return self.target_nfe
        if self.speedup is not None:
            return max(1, round(self.num_inference_steps / self.speedup))
        return None

    @property
    def plain_grid(self) -> bool:
        """Whether the budget runs the plain sampler on a grid of ``nfe_budget`` steps instead
        (``step_grid`` "auto" and a budget below ``PLAIN_GRID_BELOW``)."""
        budget = self.nfe_budget
        return (budget is not None and self.step_grid == "auto" and budget < self.num_inference_steps
                and budget < PLAIN_GRID_BELOW)

    @property
    def steps_to_run(self) -> int:
        """The denoising steps the sampler runs: the request's, or ``nfe_budget`` on the plain grid."""
        return self.nfe_budget if self.plain_grid else self.num_inference_steps

    def on_step_grid(self) -> "SpectrumConfig":
        """This config on the grid it runs: itself, or on the plain grid the budget schedule over
        ``nfe_budget`` steps with ``nfe_budget`` real ones (every step runs the block stack)."""
        if not self.plain_grid:
            return self
        steps = self.steps_to_run
        values = {**self.model_dump(include=set(SpectrumConfig.model_fields)), "num_inference_steps": steps,
                  "target_nfe": steps, "speedup": None, "warmup_steps": min(self.warmup_steps, steps)}
        return SpectrumConfig(**values)

    @property
    def predictors(self) -> tuple[str, ...]:
        """The predictors a forecast combines: the local linear extrapolation, the Chebyshev
        forecast and, with ``reuse``, the last real feature."""
        return ("linear", "chebyshev", "reuse") if self.reuse else ("linear", "chebyshev")

    @property
    def num_basis(self) -> int:
        """Number of Chebyshev basis functions ``P = M + 1``."""
        return self.degree + 1


def budget_defaults() -> dict:
    """What a config that names only a budget takes beyond the field defaults, and where its
    plain grid starts: for ``/v1/config`` and the run report."""
    return {**BUDGET_DEFAULTS, "step_grid": SpectrumConfig.model_fields["step_grid"].default,
            "plain_grid_below_nfe": PLAIN_GRID_BELOW}


# The fields a user sets (num_inference_steps comes from the sampler), in definition order.
SETTINGS = tuple(name for name in SpectrumConfig.model_fields if name != "num_inference_steps")


class SettingError(ValueError):
    """A setting that is valid in itself but not where it is used (a parallel layout, say);
    ``field`` names the ``SpectrumConfig`` field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def validation_problems(error: ValidationError) -> list[tuple[str, str]]:
    """Each problem of a pydantic ``ValidationError`` as (the field's dotted path, why)."""
    problems = []
    for entry in error.errors():
        path = ".".join(str(part) for part in entry["loc"])
        kind = entry["type"]
        if kind == "value_error":
            why = str(entry["ctx"]["error"])
        elif kind == "extra_forbidden":
            why = "unknown field"
        elif kind == "missing":
            why = "is required"
        elif kind in ("model_type", "dict_type"):
            why = f"must be an object, got {type(entry['input']).__name__}"
        else:
            shown = repr(entry["input"])
            why = f"{entry['msg'][0].lower()}{entry['msg'][1:]}, got {shown if len(shown) <= 60 else shown[:57] + '...'}"
        problems.append((path, why))
    return problems
