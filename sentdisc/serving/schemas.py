"""Request and response bodies of the HTTP API (validated by FastAPI, documented at /docs)."""
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # Unknown fields and wrong types are client errors (422), never silently coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


Neuron = Annotated[int, Field(ge=0)]


class FeaturizeRequest(_Request):
    texts: list[str] = Field(min_length=1)
    neurons: list[Neuron] | None = Field(None, min_length=1, description="default: all")


class FeaturizeResponse(BaseModel):
    features: list[list[float]] = Field(description="[len(texts), len(neurons) or rnn_size]")
    neurons: list[int] | None
    kind: str
    layer: int


class SentimentRequest(_Request):
    texts: list[str] = Field(min_length=1)


class SentimentResult(BaseModel):
    label: Literal["positive", "negative"]
    probability: float = Field(description="P(positive) from the classifier on all features")
    neuron_value: float = Field(description="the sentiment neuron's feature value")


class SentimentResponse(BaseModel):
    results: list[SentimentResult]
    neuron: int


class HeatmapRequest(_Request):
    text: str
    neuron: Neuron | None = Field(None, description="default: the sentiment neuron")
    format: Literal["png", "svg", "json"] = "png"


class HeatmapValues(BaseModel):
    chars: list[str]
    values: list[float] = Field(description="the neuron after each character (the pads are "
                                            "fed to the model, not shown)")
    neuron: int
    negated: bool = Field(description="values sign-flipped: the sentiment neuron's weight is "
                                      "negative, so that positive values read as positive")


class GenerateRequest(_Request):
    prompt: str = ""
    length: int = Field(200, ge=1)
    temperature: float = Field(1.0, ge=0, le=100)
    neuron: Neuron | None = Field(None, description="default: the sentiment neuron, else 0")
    overwrite: float | None = Field(None, description="hold the neuron at this value while "
                                       "generating (+1 positive, -1 negative for the sentiment "
                                       "neuron, whatever the sign of its weight)")
    seed: int | None = Field(None, ge=0)


class GenerateResponse(BaseModel):
    text: str
    prompt_end: int = Field(description="characters of text that are the (preprocessed) prompt")
    neuron: int
    overwrite: float | None
    chars: list[str]
    trace: list[float] = Field(description="the neuron's value after each character")
