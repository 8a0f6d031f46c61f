"""The one settings tree: defaults here, overridden by a TOML file, overridden by `EVERGREEN_*`.

Nested fields are addressed with one underscore after the section: `EVERGREEN_KAFKA_BOOTSTRAP`
sets `kafka.bootstrap`, `EVERGREEN_TRAIN_LEARNING_RATE` sets `train.learning_rate`. The config
file is `evergreen.toml` in the working directory, or the path in `EVERGREEN_CONFIG_FILE`.
No other module reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from learners.config import GateSettings, Precision, TrainSettings
from learners.hpo_config import HpoSettings
from replay.config import ReplaySettings
from streams.config import KafkaSettings

Scope = Literal["query", "ingest", "admin"]
DEV_ADMIN_KEY = "evergreen-dev-admin-key"
# A production key must resist guessing: 16 characters of `secrets.token_urlsafe` carry 96 bits.
MIN_PRODUCTION_KEY_CHARS = 16
CONFIG_FILE_ENV = "EVERGREEN_CONFIG_FILE"


class ApiKey(BaseModel):
    key: SecretStr = Field(description="The secret sent as `Authorization: Bearer <key>`.")
    scopes: set[Scope] = Field(description="What the key may do: `query`, `ingest`, `admin`.")


class ApiSettings(BaseModel):
    """The HTTP server and who may change things through it."""

    host: str = Field("127.0.0.1", description="Interface the API listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the API (0: any free port).")
    keys: list[ApiKey] = Field(
        default_factory=lambda: [ApiKey(key=SecretStr(DEV_ADMIN_KEY), scopes={"query", "ingest", "admin"})],
        description="API keys and their scopes.",
    )
    max_body_bytes: int = Field(1024 * 1024, gt=0, description="Largest accepted request body.")
    require_query_key: bool | None = Field(
        None, description="Query routes (classify, chat, completions, models) need a key with the `query` "
                          "scope. Unset: required in production, open in development.",
    )


class ServingSettings(BaseModel):
    """How answers are generated and which versions stay in memory."""

    max_tokens: int = Field(256, gt=0, description="Largest `max_tokens` a completion request may ask for.")
    default_max_tokens: int = Field(64, gt=0, description="`max_tokens` of a request that names none.")
    max_prompt_tokens: int = Field(2048, gt=0, description="Longest prompt accepted, in tokens.")
    max_batch: int = Field(16, gt=0, description="Concurrent classify requests scored together at most.")
    batch_wait_ms: float = Field(
        50.0, ge=0, description="How long to wait for the clients of the last batch to send their next "
                                "requests (a lone sequential client never waits).")
    max_classify_tokens: int = Field(
        4096, gt=0, description="Work one `/v1/classify` request may ask for: the tokens of its prompt plus "
                                "those of the labels it names (413 beyond).")
    turn_tokens: int = Field(
        128, gt=0, description="Tokens one request computes per turn at the model: a classify's prompt "
                               "tokens, then its label tokens, a chunk at a time; a generation's prompt "
                               "(then one token per turn). Requests in progress take turns, so a small "
                               "one waits for one turn of a large one, not for all of it.")
    turn_ms: float = Field(
        250.0, ge=0, description="How long a generation's turn at the model lasts, token by token, before "
                                 "it lets waiting requests go first (0: after every token).")
    shortlist_labels: int = Field(
        12, ge=0, description="Labels scored per `/v1/classify` ticket when the serving version (or, zero-shot, "
                              "the buffer) knows more: those of the ticket's nearest labelled neighbours in "
                              "the buffer, by summed similarity, topped up to this many, so a classification "
                              "costs the same at 12 labels and at 300. Labels a request names are all scored. "
                              "0: every label is scored.")
    shortlist_neighbours: int = Field(
        64, gt=0, description="Nearest labelled tickets in the buffer whose labels vote for a shortlist.")
    cached_versions: int = Field(
        0, ge=0, description="Versions besides the live one kept loaded for requests naming them, "
                             "for instant rollback (the version the live one replaced) and loaded ahead "
                             "of promotion (`POST /v1/adapters/{v}/load`); the least recently used is "
                             "released. Each holds its merged weights: +510-530 MB resident a version on "
                             "SmolLM2-135M, measured in the soak. 0: only the live version stays loaded, and "
                             "a rollback or promotion loads its version first (0.6-1.0 s on SmolLM2-135M, "
                             "while the live one keeps answering).",
    )

    @model_validator(mode="after")
    def _default_within_bound(self) -> ServingSettings:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("`default_max_tokens` must not exceed `max_tokens`")
        return self


class ModelSettings(BaseModel):
    """The frozen base model the adapters sit on."""

    base: str = Field("smollm2-135m", description="`smollm2-135m`, `tiny-llama`, or a model directory.")
    cache_dir: Path = Field(Path.home() / ".cache" / "evergreen" / "models",
                            description="Where converted base models are kept.")
    threads: int = Field(0, ge=0, description="Torch CPU threads (0: torch's default).")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Where the served model runs: `auto` (CUDA when there is a GPU, else the CPU), `cpu`, `cuda` "
                    "or `cuda:N`. Checked at start-up. Also where updates train unless `train.device` says.")
    precision: Precision = Field(
        "float32", description="Precision of the base model's weights, serving and training alike: `float32`, "
                               "`bfloat16` (half the memory; CPUs and GPUs from Ampere on) or `float16` (CUDA "
                               "only; training scales the loss). Adapter weights and losses stay fp32.")
    gguf: Path | None = Field(
        None, description="The base model's own GGUF file, whose metadata and tokenizer GGUF exports copy "
                          "(`evergreen export`). Unset: the packaged file for `smollm2-135m`; for other bases "
                          "they are written from the Hugging Face config and tokenizer.json.")


class RegistrySettings(BaseModel):
    """How many old adapter versions keep their weights on disk; pruned after every update."""

    keep_rejected: int = Field(
        10, ge=0, description="Versions the gate rejected and nobody promoted whose weights are kept, the "
                              "newest; older ones keep only their record (gate report, accuracy, still listed "
                              "and still quarantining their windows) and can no longer be promoted.")
    keep_superseded: int = Field(
        10, ge=0, description="Other versions not live (once live, or accepted but never served) whose weights "
                              "are kept, the newest; rollback reaches back through these. The live version, "
                              "the one a rollback returns to and the first version are always kept besides.")
    keep_updates: int = Field(
        200, ge=1, description="Update records kept (`/v1/updates`), the newest, in memory and in `updates.jsonl` "
                               "beside the registry, so they outlive a restart; a version's gate report stays in "
                               "its own metadata.")


class SchedulerSettings(BaseModel):
    """When updates run on their own."""

    enabled: bool = Field(True, description="Run updates on a schedule.")
    check_seconds: float = Field(10.0, gt=0, description="How often the trigger condition is checked.")
    min_new_records: int = Field(
        200, gt=0, description="Start an update once the open window holds this many records."
    )
    max_wait_seconds: float | None = Field(
        1800, gt=0, description="Also start one once the open window's oldest record has waited this long, "
                                "however few records it holds, so a quiet stream is still learned "
                                "(unset: volume only).")
    interval_seconds: float | None = Field(
        None, gt=0, description="Also start an update this often (unset: no interval trigger).")
    cron: str | None = Field(
        None, description="Also start an update on this crontab schedule, e.g. `0 3 * * *` (unset: none).")
    misfire_grace_seconds: float = Field(
        3600, gt=0, description="A run missed while the service was down still runs at start if this recent.")
    jobstore: Path | None = Field(
        None, description="SQLite file of the persistent job store (unset: `scheduler.sqlite` in `data_dir`).")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                CronTrigger.from_crontab(value)
            except ValueError as exc:
                raise ValueError(f"`cron` is not a crontab expression: {exc}") from exc
        return value


class ReplicaSettings(BaseModel):
    """Running several instances: one primary, any number of serve-only replicas."""

    role: Literal["primary", "replica"] = Field(
        "primary", description="`replica`: serve only (no ingestion, scheduler or updates), follow the "
                               "primary's promotions on `topic` and read versions from the shared registry.")
    topic: str = Field("evergreen.promotions", description="Kafka topic of live-pointer moves.")
    poll_timeout_ms: int = Field(500, gt=0, description="How long one poll of the promotion topic waits (ms).")


class FederationSettings(BaseModel):
    """This service as a site of a federation (`evergreen federate site`, `/v1/federation`)."""

    max_weights_bytes: int = Field(64 * 1024 * 1024, gt=0, description="Largest adapter (safetensors bytes) the "
                                   "federation routes accept from the hub; their bodies may be a third larger "
                                   "(base64 in JSON).")
    fit_learning_rate_scale: float = Field(
        3.0, gt=0, le=20, description="A federated round's fit trains at `train.learning_rate` times this. A site "
        "holds a share of the window the hub averages over, so its update takes that share of the steps and "
        "FedAvg dilutes it with sites that hardly saw its intents. Three sites' FedAvg reached 0.88 x the "
        "centralized accuracy at 1; at 3, 1.02 x and 0.96 x on two streams (docs/benchmarks.md). A private "
        "fit trains at `train.privacy.learning_rate`, unscaled: its adapter's rate is already at the edge "
        "(0.1 diverged).")

    def fit_train(self, train: TrainSettings) -> TrainSettings:
        """`train` as a federated round's fit trains."""
        return train.model_copy(update={"learning_rate": train.learning_rate * self.fit_learning_rate_scale})


class DemoSettings(BaseModel):
    """The built-in BANKING77 stream that `evergreen up` runs (see `service.demo`)."""

    enabled: bool = Field(True, description="Stream the demo data set on `evergreen up`.")
    windows: int = Field(3, gt=0, description="Windows of new intents to stream; each is learned by one update.")
    intents_per_window: int = Field(4, gt=0, description="New intents per window.")
    # Sized so that the whole story (learned, refused, learned) fits 10 minutes on 2 cores.
    per_intent: int = Field(16, gt=0, description="Tickets per intent.")
    scrambled_window: int | None = Field(
        2, ge=1, description="This window's labels are scrambled across its tickets, to show the gate refusing "
                             "a bad batch (unset: every window is healthy).")
    rate: float = Field(8.0, gt=0, description="Tickets per second.")
    seed: int = Field(0, description="Seed of the intent order.")


class Settings(BaseSettings):
    """Everything Evergreen can be told, in one tree."""

    model_config = SettingsConfigDict(env_prefix="EVERGREEN_", env_nested_delimiter="_",
                                      env_nested_max_split=1, extra="forbid")

    environment: Literal["development", "production"] = Field(
        "development", description="`production` refuses development defaults such as the dev key."
    )
    data_dir: Path = Field(Path("data"), description="Buffer and adapter registry live here.")
    registry_dir: Path | None = Field(
        None, description="Adapter registry (unset: `registry` in `data_dir`); replicas share it.")
    kafka: KafkaSettings = KafkaSettings()
    model: ModelSettings = ModelSettings()
    replay: ReplaySettings = ReplaySettings()
    train: TrainSettings = TrainSettings()
    gate: GateSettings = GateSettings()
    hpo: HpoSettings = HpoSettings()
    registry: RegistrySettings = RegistrySettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    api: ApiSettings = ApiSettings()
    serving: ServingSettings = ServingSettings()
    replicas: ReplicaSettings = ReplicaSettings()
    federation: FederationSettings = FederationSettings()
    demo: DemoSettings = DemoSettings()

    @model_validator(mode="after")
    def _no_development_defaults_in_production(self) -> Settings:
        if self.environment == "production":
            if any(k.key.get_secret_value() == DEV_ADMIN_KEY for k in self.api.keys):
                raise ValueError("`api.keys` still holds the development key in production")
            if any(len(k.key.get_secret_value()) < MIN_PRODUCTION_KEY_CHARS for k in self.api.keys):
                raise ValueError(f"`api.keys`: a production key needs at least {MIN_PRODUCTION_KEY_CHARS} "
                                 "characters (make one with `python -c 'import secrets; "
                                 "print(secrets.token_urlsafe(32))'`)")
            if self.kafka.bootstrap is None:
                raise ValueError("`kafka.bootstrap` must be set in production")
        if self.api.require_query_key is None:
            self.api.require_query_key = self.environment == "production"
        if self.train.privacy.enabled and self.hpo.searching:
            raise ValueError("`train.privacy.enabled` needs `hpo.trials` 0 or 1: a search trains on the tickets "
                             "once a trial, and its trials are not accounted")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get(CONFIG_FILE_ENV, "evergreen.toml"))
        if CONFIG_FILE_ENV in os.environ and not config_file.exists():
            raise FileNotFoundError(f"{CONFIG_FILE_ENV} names {config_file}, which does not exist")
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file=config_file)


def use_config_file(path: Path) -> None:
    """Make `path` the config file of every Settings() made afterwards in this process."""
    os.environ[CONFIG_FILE_ENV] = str(path)


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings as JSON-ready data, every secret shown as `**********`."""
    return settings.model_dump(mode="json")
