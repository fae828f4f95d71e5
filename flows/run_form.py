"""The run form: what a person may change for one retrain run, in the Prefect UI or by `regraft run --set`. Each
field sets one params.yaml key, with that key's type, bounds and help (tasks/config.py `config_field`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from tasks.config import config_field, parse_override

# The fields of the UI's run form, each setting one params.yaml key. Type, bounds and help come from
# that key's field in tasks/config.py, so the form cannot drift from the configuration.
FORM_FIELDS = {
    "time_cutoff": "ingest.split.time_cutoff",
    "holdout_fraction": "ingest.split.holdout_fraction",
    "split_seed": "ingest.split.seed",
    "strategy": "train.strategy",
    "epochs": "train.epochs",
    "on_severe_shift": "shift.on_severe",
}


class RunOptions(BaseModel):
    """What a person may change for one run. Empty fields leave params.yaml as it is."""

    model_config = ConfigDict(extra="forbid")

    overrides: list[str] = Field(
        default_factory=list, description="Any other params.yaml key, as KEY=VALUE (e.g. validate.min_rows_per_class=10).",
    )
    push: bool = Field(default=True, description="Push data and models to the DVC remote after a successful run.")

    def as_overrides(self) -> dict[str, Any]:
        """Dotted params.yaml keys and values; the form's fields win over free-form ones."""
        result = dict(parse_override(item) for item in self.overrides)
        values = self.model_dump(mode="json")
        for name, key in FORM_FIELDS.items():
            if values.get(name) is not None:
                result[key] = values[name]
        return result


def form_field(key: str) -> tuple[Any, Any]:
    """An optional form field with the type, bounds and help of the params.yaml key it sets."""
    info = config_field(key)
    optional = info.annotation | None
    return (Annotated[optional, *info.metadata] if info.metadata else optional,
            Field(default=None, description=f"{info.description} ({key})", json_schema_extra={"param": key}))


RetrainParameters = create_model(
    "RetrainParameters", __base__=RunOptions, __module__=__name__,
    **{name: form_field(key) for name, key in FORM_FIELDS.items()},
)
