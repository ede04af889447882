"""Request bodies of the two generation APIs (pydantic), and the limits they are checked against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_IMAGES = 10  # images per request (OpenAI's limit for n)
MAX_STEPS = 150  # AUTOMATIC1111's limit
MAX_PROMPT = 4000  # characters (the CLIP tokenizer truncates at 77 tokens anyway)


class InputError(ValueError):
    """A request field is invalid: answered with 400 and a message naming ``field``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class OpenAIImageRequest(BaseModel):
    """``POST /v1/images/generations``: the OpenAI Images API subset plus sdkern extensions.

    Unknown fields (``quality``, ``style``, ``user``, ...) are accepted and ignored, as clients send them.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str | None = Field(None, description='"WIDTHxHEIGHT" (default: the model\'s native size)')
    response_format: str | None = Field("b64_json", description="b64_json only (url is not supported)")
    # sdkern extensions
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0)
    seed: int | None = Field(None, ge=-1, lt=2**63, description="seed of the first image; image k uses seed+k")
    scheduler: str = "ddim"


class A1111Txt2ImgRequest(BaseModel):
    """``POST /sdapi/v1/txt2img``: the AUTOMATIC1111 WebUI subset. Other WebUI fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field("", max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(7.0, ge=0.0, le=50.0)
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    seed: int = Field(-1, ge=-1, lt=2**63)
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES)
    sampler_name: str | None = None
    sampler_index: str | None = None  # the older WebUI name of sampler_name
