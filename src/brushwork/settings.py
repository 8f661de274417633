"""Where brushwork keeps things, and the defaults a user can set once.

Read from the environment (``BRUSHWORK_*``) and an optional ``settings.json`` in the home
folder; nothing is read at import time, and nothing is global: build a ``Settings`` and pass it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


def _default_home() -> Path:
    return Path(os.environ.get("BRUSHWORK_HOME", Path.home() / ".brushwork")).expanduser()


_YES, _NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass
class Settings:
    home: Path = field(default_factory=_default_home)
    models_dir: Path | None = None  # default: <home>/models
    outputs_dir: Path = Path("outputs")
    default_model: str | None = None
    device: str = "auto"
    precision: str = "auto"
    memory: str = "auto"
    watermark: bool = True
    compile: bool = False  # torch.compile the UNet when a model loads (pays for long sessions: minutes to compile)
    # where a CPU runs the UNet, VAE decoder and text encoders: auto (OpenVINO for large models where installed and faster),
    # torch, openvino (engine/backends.py)
    backend: str = "auto"
    threads: int = 0  # CPU threads for torch; 0 = torch's default (one per physical core)
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    # what one server request may ask for (a shared server's owner may lower them; the CLI is not bound)
    max_steps: int = 1000
    max_side: int = 4096
    max_images: int = 1000
    # the server's job queue and history: None = SQLite in <home>/data; postgresql://... = a database several
    # servers share (BRUSHWORK_DATABASE_URL; server/pgstore.py)
    database_url: str | None = None
    # the pictures in an S3-compatible bucket as well, for machines that share no folder (output/bucket.py):
    # s3://bucket/prefix; the endpoint of a non-AWS store (MinIO, Ceph, Swift ...); credentials as boto3 finds them
    outputs_bucket: str | None = None
    outputs_bucket_endpoint: str | None = None
    # `brushwork serve --ray` (docs/scale.md): the generation replicas of the Ray Serve deployment
    ray_min_replicas: int = 1  # kept running even when idle (0: none until a job comes)
    ray_max_replicas: int = 0  # 0 = as many as the cluster holds: one per GPU, else one per ray_cpus_per_replica
    ray_cpus_per_replica: int = 4  # CPU cores a replica holds where there is no GPU
    # GPUs a replica holds: 1 = one replica per GPU; 0.5 = two replicas share each card (small models), 2 = two
    # cards for one (they are visible to it; the engine uses the first)
    ray_gpus_per_replica: float = 1.0
    ray_target_ongoing_requests: int = 1  # autoscaling: jobs per replica (running and waiting) before one more starts

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser()
        self.models_dir = Path(self.models_dir).expanduser() if self.models_dir else self.home / "models"
        self.outputs_dir = Path(self.outputs_dir).expanduser()

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def data_dir(self) -> Path:
        """The server's database, queue and uploaded files."""
        return self.home / "data"

    @classmethod
    def load(cls, **overrides) -> Settings:
        """Defaults < ``<home>/settings.json`` < ``BRUSHWORK_*`` environment < explicit overrides."""
        home = Path(overrides.get("home") or _default_home()).expanduser()
        values: dict = {}
        path = home / "settings.json"
        if path.is_file():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError):
                loaded = {}  # a broken settings file must not stop the program; defaults apply
            loaded = loaded if isinstance(loaded, dict) else {}
            values.update(loaded)
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(k for k in values if k not in names or k == "home")
        if unknown:  # a typo must not be silently ignored
            from .request import BrushworkError

            raise BrushworkError(f"{path}: unknown setting {unknown[0]!r}; the settings are: "
                                 f"{', '.join(n for n in names if n != 'home')}")
        for name in names:
            env = os.environ.get(f"BRUSHWORK_{name.upper()}")
            if env is not None:
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("watermark", "compile"):
            if isinstance(values.get(name), str) and values[name].strip().lower() in _YES + _NO:
                values[name] = values[name].strip().lower() in _YES
        from .request import BrushworkError

        for name in ("max_upload_bytes", "max_image_pixels", "threads", "max_steps", "max_side", "max_images",
                     "ray_min_replicas", "ray_max_replicas", "ray_cpus_per_replica", "ray_target_ongoing_requests"):
            if name in values:
                value = values[name]
                try:
                    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                        raise ValueError
                    values[name] = int(value)  # NaN: ValueError, Infinity: OverflowError
                    if values[name] < 0 or values[name] > 2**62:
                        raise ValueError
                except (TypeError, ValueError, OverflowError):
                    raise BrushworkError(
                        f"setting {name} must be a whole number of 0 or more, got {value!r}; fix "
                        f"BRUSHWORK_{name.upper()} or {path}"
                    ) from None
        if "ray_gpus_per_replica" in values:
            value = values["ray_gpus_per_replica"]
            try:
                if isinstance(value, bool):
                    raise ValueError
                number = float(value)
                if not 0 < number <= 64 or (number > 1 and not number.is_integer()):
                    raise ValueError
                values["ray_gpus_per_replica"] = number
            except (TypeError, ValueError):
                raise BrushworkError(f"setting ray_gpus_per_replica must be a fraction of a GPU (above 0, up to 1) or a "
                                     f"whole number of GPUs, got {value!r}; fix BRUSHWORK_RAY_GPUS_PER_REPLICA or "
                                     f"{path}") from None
        for name in ("watermark", "compile"):
            if name in values and not isinstance(values[name], bool):
                raise BrushworkError(f"setting {name} must be true or false, got {values[name]!r}; fix "
                                     f"BRUSHWORK_{name.upper()} or {path}")
        for name in ("models_dir", "outputs_dir", "default_model", "device", "precision", "memory", "backend",
                     "database_url", "outputs_bucket", "outputs_bucket_endpoint"):
            if values.get(name) is not None and not isinstance(values[name], str | Path):
                raise BrushworkError(f"setting {name} must be text, got {values[name]!r}; fix {path}")
        if isinstance(values.get("backend"), str):
            values["backend"] = values["backend"].strip().lower()
            if values["backend"] not in ("auto", "torch", "openvino"):
                raise BrushworkError(f"setting backend must be auto, torch or openvino, got {values['backend']!r}; "
                                     f"fix BRUSHWORK_BACKEND or {path}")
        for name in ("outputs_bucket", "outputs_bucket_endpoint"):
            if isinstance(values.get(name), str):
                values[name] = values[name].strip() or None
        if values.get("outputs_bucket"):
            from .output.bucket import parse_url

            try:
                parse_url(values["outputs_bucket"])
            except BrushworkError as err:
                raise BrushworkError(f"{err}; fix BRUSHWORK_OUTPUTS_BUCKET or {path}") from None
        endpoint = values.get("outputs_bucket_endpoint")
        if endpoint and not re.match(r"^https?://[^\s/]+(/\S*)?$", str(endpoint)):
            raise BrushworkError(f"setting outputs_bucket_endpoint must be an http:// or https:// URL, got "
                                 f"{str(endpoint)[:200]!r}; fix BRUSHWORK_OUTPUTS_BUCKET_ENDPOINT or {path}")
        values = {k: v for k, v in values.items() if k in names}
        values.setdefault("home", home)
        return cls(**values)

    def save(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        path = self.home / "settings.json"
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "home"}
        path.write_text(json.dumps(data, indent=2))
        return path
