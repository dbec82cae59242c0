"""Request and response bodies of the HTTP API (validated by FastAPI, documented at /docs).

Every limit a request can break is in the schema: the fixed ones here, the per-deployment caps
(texts per request, bytes per text, generate length) written into /openapi.json by
``apply_caps`` from the replica's AppArgs. The one rule for texts everywhere: at least one
non-whitespace character once HTML entities are unescaped, as the model reads it
(``sentdisc.text.preprocess``; a blank text has no sentiment, no heatmap, no features worth
asking for); a generation prompt may be empty.
"""
from typing import Annotated, Literal

from annotated_types import Ge, Le
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from sentdisc.text import is_blank
from sentdisc.viz import MAX_OVERWRITE, MAX_SEED

TEXT_RULE = r"\S"   # JSON Schema / pydantic pattern: somewhere, a non-whitespace character
TEXT_ABOUT = "at least one non-whitespace character once HTML entities are unescaped"
TEMPERATURE_MAX = 100.0


class _Request(BaseModel):
    # Unknown fields and wrong types are client errors (422), never silently coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


def _integral(v):
    # JSON Schema's "integer" includes 41.0 (a number with no fraction); strict pydantic would
    # refuse it. Strings and booleans stay refused.
    return int(v) if isinstance(v, float) and v.is_integer() else v


def Int(lo: int, hi: int):  # a type: named like one
    # Bounds as annotated_types (pydantic then writes minimum/maximum into the schema, which
    # Field(ge=..) beside a BeforeValidator does not), the validator last.
    return Annotated[int, Ge(lo), Le(hi), BeforeValidator(_integral)]


def _not_blank(text: str) -> str:
    # The pattern lets through texts the model reads as blank: whitespace spelled as entities
    # (&nbsp;, &#10;), and \x1c-\x1f, which pydantic's Rust regex calls non-whitespace but
    # Python's strip (so preprocess, and a JSON Schema fuzzer's regex) calls whitespace.
    if is_blank(text):
        raise PydanticCustomError("blank_text", "the text is blank once preprocessed (HTML "
                                                "entities unescaped, whitespace stripped): "
                                                "it needs at least one non-whitespace character")
    return text


Neuron = Int(0, 1 << 20)
Text = Annotated[str, Field(min_length=1, pattern=TEXT_RULE, description=TEXT_ABOUT),
                 AfterValidator(_not_blank)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class FeaturizeRequest(_Request):
    texts: list[Text] = Field(min_length=1)
    neurons: list[Neuron] | None = Field(None, min_length=1, description="default: all")


class FeaturizeResponse(BaseModel):
    features: list[list[Finite]] = Field(description="[len(texts), len(neurons) or rnn_size]")
    neurons: list[int] | None
    kind: str
    layer: int


class SentimentRequest(_Request):
    texts: list[Text] = Field(min_length=1)


class SentimentResult(BaseModel):
    label: str = Field(description="the classifier's label: positive or negative (or the two "
                                   "classes a binary classifier was fitted on)")
    probability: Finite = Field(ge=0, le=1, description="P(positive), the second label's "
                                                        "probability, from all features")
    neuron_value: Finite = Field(description="the sentiment neuron's feature value")


class SentimentResponse(BaseModel):
    results: list[SentimentResult]
    neuron: int


class ClassifyRequest(_Request):
    texts: list[Text] = Field(min_length=1)


class ClassifyResult(BaseModel):
    label: str | None = Field(description="binary and multiclass: the predicted label; "
                                          "multilabel: null (see labels)")
    labels: list[str] = Field(description="the predicted labels: the one label (binary, "
                                          "multiclass), or every label over 0.5 (multilabel)")
    probabilities: dict[str, Finite] = Field(description="every label's probability (they sum "
                                                         "to 1 except for multilabel)")


class ClassifyResponse(BaseModel):
    results: list[ClassifyResult]
    label_kind: Literal["binary", "multiclass", "multilabel"]
    labels: list[str] = Field(description="the classifier's labels, in its order")


class _PicksNeuron(_Request):
    """A request that names a neuron, or a label whose neuron it means: one or the other (an
    explicit null is not naming one)."""
    model_config = ConfigDict(json_schema_extra={"not": {
        "required": ["neuron", "label"],
        "properties": {"neuron": {"type": "integer"}, "label": {"type": "string"}}}})

    @model_validator(mode="after")
    def _neuron_or_label(self):
        if self.neuron is not None and self.label is not None:
            raise ValueError("give neuron or label, not both")
        return self


class HeatmapRequest(_PicksNeuron):
    text: Text
    neuron: Neuron | None = Field(None, description="default: the sentiment neuron")
    label: str | None = Field(None, max_length=1000, description=(
        "a multi-class or multi-label classifier's label: the neuron that stands for it (its "
        "largest weight for that label), signed toward the label (instead of neuron)"))
    format: Literal["png", "svg", "json"] = "png"


class HeatmapValues(BaseModel):
    chars: list[str]
    values: list[Finite] = Field(description="the neuron after each character (the pads are "
                                             "fed to the model, not shown)")
    neuron: int
    negated: bool = Field(description="values sign-flipped: the sentiment neuron's weight is "
                                      "negative, so that positive values read as positive")


class GenerateRequest(_PicksNeuron):
    prompt: str = ""
    length: Int(1, 1 << 20) = 200
    temperature: float = Field(1.0, ge=0, le=TEMPERATURE_MAX, allow_inf_nan=False,
                               description="sampling temperature; below 1e-4 (0 included) "
                                           "each byte is the most likely one (greedy)")
    neuron: Neuron | None = Field(None, description="default: the sentiment neuron, else 0")
    label: str | None = Field(None, max_length=1000, description=(
        "a multi-class or multi-label classifier's label: the neuron that stands for it "
        "(instead of neuron; overwrite +1 is toward the label)"))
    overwrite: float | None = Field(None, ge=-MAX_OVERWRITE, le=MAX_OVERWRITE,
                                    allow_inf_nan=False, description=(
                                        "hold the neuron at this value while generating (+1 "
                                        "positive, -1 negative for the sentiment neuron, "
                                        "whatever the sign of its weight)"))
    seed: Int(0, MAX_SEED) | None = Field(None, description="same seed, same text")


class GenerateResponse(BaseModel):
    text: str
    prompt_end: int = Field(description="characters of text that are the (preprocessed) prompt")
    neuron: int
    overwrite: Finite | None
    chars: list[str]
    trace: list[Finite] = Field(description="the neuron's value after each character")


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Error(BaseModel):
    """Every error response: a list of problems, each with where (loc) and what (msg)."""
    detail: list[ErrorItem] | str


def errors(*codes: int) -> dict:
    """The documented error responses of an endpoint (FastAPI ``responses=``)."""
    about = {400: "the body is not JSON (bytes that do not decode, an integer of over 4300 "
                  "digits, nesting too deep): the message says what failed",
             413: "the body is larger than any valid request can be",
             415: "the body is not sent as JSON: send Content-Type: application/json",
             422: "a field breaks its schema (caps included) or a rule the schema states",
             500: "a fault in the server (the log has it; the message never does)",
             409: "the classifier is not binary: /sentiment answers binary classifiers, "
                  "/classify every kind",
             503: "the model is not loaded (its reason), no classifier is loaded, or the "
                  "queue is full; Retry-After only where it may clear (a full queue, a model "
                  "process being replaced), not for a deployment that lacks the model or a "
                  "classifier"}
    return {c: {"model": Error, "description": about[c]} for c in codes}


def _cap_ints(prop: dict, maximum: int) -> None:
    """Set ``maximum`` on the integer schemas in ``prop`` (itself, its items, its anyOf)."""
    for sub in [prop, prop.get("items", {}), *prop.get("anyOf", [])]:
        if sub.get("type") == "integer":
            sub["maximum"] = maximum
        elif sub.get("type") == "array":
            _cap_ints(sub.get("items", {}), maximum)


def apply_caps(spec: dict, max_texts: int, max_text_bytes: int, max_generate_length: int,
               rnn_size: int | None, labels: list[str] | None = None,
               classifier: bool | None = None) -> dict:
    """Write one deployment's caps into its OpenAPI document (``spec``, changed in place):
    texts per request, bytes per text, generate length, the neurons its model has, and the
    labels that have a neuron (``labels``: a multi-class or multi-label classifier's; [] for
    none, so ``label`` can only be null). ``classifier=False`` (none loaded): no sentiment
    neuron to default to, so a heatmap's ``neuron`` is required and a generation's defaults
    to 0; None: unknown (the model did not load), left as documented.

    JSON Schema counts characters, the cap counts UTF-8 bytes: maxLength is the byte cap (a text
    longer than that in characters is over it in bytes too), and the description says bytes.
    """
    schemas = spec.get("components", {}).get("schemas", {})

    def cap_text(prop: dict) -> None:
        prop["maxLength"] = max_text_bytes
        prop["description"] = f"{TEXT_ABOUT}, at most {max_text_bytes} UTF-8 bytes"

    for name in ("FeaturizeRequest", "SentimentRequest", "ClassifyRequest"):
        texts = schemas.get(name, {}).get("properties", {}).get("texts")
        if texts:
            texts["maxItems"] = max_texts
            cap_text(texts["items"])
    heat = schemas.get("HeatmapRequest", {}).get("properties", {})
    if "text" in heat:
        cap_text(heat["text"])
    gen = schemas.get("GenerateRequest", {}).get("properties", {})
    if gen:
        gen["length"]["maximum"] = max_generate_length
        gen["length"]["default"] = min(gen["length"].get("default", 1), max_generate_length)
        gen["prompt"]["maxLength"] = max_text_bytes
    if rnn_size:
        for name, field in (("FeaturizeRequest", "neurons"), ("HeatmapRequest", "neuron"),
                            ("GenerateRequest", "neuron")):
            prop = schemas.get(name, {}).get("properties", {}).get(field)
            if prop:
                _cap_ints(prop, rnn_size - 1)
    if labels is not None:
        for name in ("HeatmapRequest", "GenerateRequest"):
            prop = schemas.get(name, {}).get("properties", {}).get("label")
            if prop:
                about = prop.get("description", "")
                prop.clear()
                if labels:
                    prop["anyOf"] = [{"type": "string", "enum": list(labels)}, {"type": "null"}]
                else:
                    prop["type"] = "null"
                    about += (" (none here: no classifier is loaded)" if classifier is False
                              else " (none here: this classifier's neurons are not per label)")
                prop.update(default=None, description=about)
    if classifier is False:
        heat = schemas.get("HeatmapRequest", {})
        neuron = heat.get("properties", {}).get("neuron")
        if neuron:
            integer = next((s for s in neuron.get("anyOf", []) if s.get("type") == "integer"),
                           None)
            if integer is not None:
                neuron.clear()
                neuron.update(integer)
            neuron.pop("default", None)
            neuron["description"] = "required here: no classifier is loaded to name the " \
                                    "sentiment neuron"
            heat["required"] = sorted({*heat.get("required", []), "neuron"})
        neuron = gen.get("neuron") if gen else None
        if neuron:
            neuron["description"] = "default: 0 (no classifier is loaded to name the " \
                                    "sentiment neuron)"
    return spec
