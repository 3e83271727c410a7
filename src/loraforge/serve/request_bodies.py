"""The JSON bodies the OpenAI-compatible API accepts (pydantic models; FastAPI validates requests with them
and publishes them in the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat. Types are strict: ``"0.5"`` is not a temperature."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    """Extension (as in vLLM): sample among the k most likely tokens; 0 = off."""
    stop: str | list[str] | None = None
    seed: int | None = None
    """Checked by ``SamplingParams``: an integer in [-2**63, 2**64)."""
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    """Extension (as in vLLM): keep generating past the end-of-sequence token."""

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for each option set that the engine doesn't implement."""
        problems = []
        if self.n != 1:
            problems.append(("n", "only n=1 is supported"))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                problems.append((name, f"{name} is not supported (send 0 or leave it out)"))
        if self.logit_bias:
            problems.append(("logit_bias", "logit_bias is not supported"))
        return problems


class CompletionBody(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        problems = super().unsupported()
        if self.echo:
            problems.append(("echo", "echo is not supported"))
        if self.suffix:
            problems.append(("suffix", "suffix (insertion) is not supported"))
        if self.logprobs is not None:
            problems.append(("logprobs", "logprobs are not supported"))
        if self.best_of not in (None, 1):
            problems.append(("best_of", "only best_of=1 is supported"))
        return problems


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    url: str
    """A ``data:image/...;base64,`` URL, or a local file under the server's image root (``--image-root``)."""


class ImagePart(BaseModel):
    """OpenAI's ``image_url`` content part; vision-language models only."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class ChatBody(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        problems = super().unsupported()
        if self.logprobs:
            problems.append(("logprobs", "logprobs are not supported"))
        for name in ("tools", "functions"):
            if getattr(self, name):
                problems.append((name, f"{name} (function calling) are not supported"))
        if self.response_format and self.response_format.get("type") != "text":
            problems.append(("response_format", "only response_format {'type': 'text'} is supported"))
        return problems


class LoadAdapterBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = Field(min_length=1)
