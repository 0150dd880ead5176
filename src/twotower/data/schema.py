"""The schema file: which tables, which columns mean what, which features, how big.

A YAML file, validated on load (pydantic); an error names the file, the field and what
is wrong with it. Relative paths are relative to the schema file. A complete example::

    events:                       # one row per training example
      path: data/events.parquet   # a Parquet or CSV file, or a directory of them
      user: user_id
      item: item_id
      time: timestamp             # a clock, or any per-user ordering (a position)
      reward: watch_fraction      # optional; every event weighs 1 without it
      ties: simultaneous          # a user's events at one time: see none of each other,
                                  # or `ordered`: each sees those before it in the file
    items:                        # one row per corpus item
      path: data/items.parquet
      key: item_id
    missing_items: drop           # events whose item is not in items: drop (counted) or error
    cleaning: {dedupe: true, k_core: 5}
    query_features:
      - {name: user_id, kind: id, table: user}
      - {name: history, kind: id_list, history: item_id, length: 20, table: item}
      - {name: history_category, kind: id_list, history: category, length: 20, table: category}
    item_features:
      - {name: item_id, kind: id, table: item}
      - {name: category, kind: id}
    tables:
      item: {buckets: 262144, dim: 32}      # default: buckets auto, dim from model
    model: {dim: 32, hidden: [256], output_dim: 64, temperature: 0.05}
    split: {kind: time, test_fraction: 0.1}  # or {kind: leave-last-out}, {kind: column, ...}

A query feature is an events column, or, with ``history``, the given item column over
the user's newest ``length`` items strictly before the event. Features naming the same
``table`` share it (the paper shares the history's table with the item id's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from twotower.data.cleaning import Cleaning
from twotower.data.history import HistoryFeature
from twotower.data.interactions import HISTORY, Columns, Ties
from twotower.features import FeatureSpec

__all__ = ["Schema", "SchemaError", "load_schema", "parse_schema"]


class SchemaError(ValueError):
    """A schema that does not validate; the message lists every problem."""


def _no_nul(path: str) -> str:
    """No file name holds a NUL; caught here, it would be a bare ``ValueError`` later."""
    if "\0" in path:
        raise ValueError("a path cannot contain a NUL character")
    return path


PathText = Annotated[str, AfterValidator(_no_nul)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EventsConfig(_Strict):
    """The events table and the roles of its columns."""

    path: PathText | None = None
    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    reward: str | None = None
    ties: Ties = "simultaneous"


class ItemsConfig(_Strict):
    """The items table and its key column."""

    path: PathText | None = None
    key: str = "item_id"


class FeatureConfig(_Strict):
    """One tower input: ``id`` (hashed), ``id_list`` (bag of ids) or ``dense`` (numbers)."""

    name: str = Field(min_length=1)
    kind: Literal["id", "id_list", "sequence", "dense"]
    table: str | None = None
    history: str | None = None
    length: int | None = Field(default=None, ge=1)
    weights: str | None = None
    width: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureConfig:
        if self.kind == "sequence" and self.history is None:
            raise ValueError("a sequence is a history feature: add `history: COLUMN` and "
                             "`length: N`")
        if self.history is not None:
            if self.kind not in ("id_list", "sequence"):
                raise ValueError(f"a history feature is a list of ids: kind must be id_list "
                                 f"or sequence, got {self.kind}")
            if self.length is None:
                raise ValueError("a history feature needs a length (the newest items it keeps)")
            if self.weights is not None:
                raise ValueError("a history feature takes no weights column")
        elif self.length is not None:
            raise ValueError("length is only for history features (add `history: COLUMN`)")
        if self.kind == "dense" and (self.table is not None or self.weights is not None):
            raise ValueError("a dense feature has no table and no weights")
        if self.kind != "id_list" and self.weights is not None:
            raise ValueError("only an id_list feature takes weights")
        return self

    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.name, self.kind, self.table, self.weights, self.width,
                           self.length if self.kind == "sequence" else None)


class TableConfig(_Strict):
    """An embedding table; ``buckets: auto`` sizes it from the data (see experiment)."""

    buckets: int | Literal["auto"] = "auto"
    dim: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _positive(self) -> TableConfig:
        if self.buckets != "auto" and self.buckets < 1:
            raise ValueError(f"buckets must be >= 1 or auto, got {self.buckets}")
        return self


class ModelSettings(_Strict):
    """Tower shapes and temperature; ``dim`` is the default width of every table."""

    dim: int = Field(default=32, ge=1)
    # A width of 0 trains a tower whose output ignores its input; one below 0 cannot be built.
    hidden: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [256])
    output_dim: int = Field(default=64, ge=1)
    normalize: bool = True
    temperature: float = Field(default=0.05, gt=0)
    # Dropout on the embedding front regularises the towers on the sparse logs a schema
    # usually describes (few events per user); benchmarks/quality has the ablation rows.
    dropout: float = Field(default=0.2, ge=0, lt=1)
    # Each id of a query's list features (the item history) left out of its mean while
    # training: the same few items of a short history would otherwise make the same query
    # every epoch. Neutral on long histories (benchmarks/quality has the rows).
    history_dropout: float = Field(default=0.5, ge=0, lt=1)


class CleaningConfig(_Strict):
    dedupe: bool = False
    min_user_events: int = Field(default=0, ge=0)
    min_item_events: int = Field(default=0, ge=0)
    k_core: int = Field(default=0, ge=0)


class SplitConfig(_Strict):
    """``time`` (with ``cutoff`` or ``test_fraction``), ``leave-last-out``, or ``column``
    (an events column of ``train`` / ``valid`` / ``test``)."""

    kind: Literal["time", "leave-last-out", "column"]
    cutoff: int | None = None
    test_fraction: float | None = Field(default=None, gt=0, lt=1)
    column: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _parameters(self) -> SplitConfig:
        given = (self.cutoff is not None) + (self.test_fraction is not None)
        if self.kind == "time" and given != 1:
            raise ValueError("a time split needs exactly one of cutoff or test_fraction")
        if self.kind != "time" and given:
            raise ValueError(f"a {self.kind} split takes no cutoff or test_fraction")
        if (self.kind == "column") != (self.column is not None):
            raise ValueError("a column split names its column (`column: NAME`), and only it "
                             "does")
        return self


class Schema(_Strict):
    """A whole schema file (see the module docstring for an example)."""

    events: EventsConfig = Field(default_factory=EventsConfig)
    items: ItemsConfig = Field(default_factory=ItemsConfig)
    movielens: PathText | None = None
    missing_items: Literal["error", "drop"] = "drop"
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig)
    query_features: list[FeatureConfig] = Field(min_length=1)
    item_features: list[FeatureConfig] = Field(min_length=1)
    tables: dict[str, TableConfig] = Field(default_factory=dict)
    model: ModelSettings = Field(default_factory=ModelSettings)
    split: SplitConfig | None = None

    @model_validator(mode="after")
    def _coherent(self) -> Schema:
        if self.movielens is None and (self.events.path is None or self.items.path is None):
            raise ValueError("give events.path and items.path (or movielens: DIRECTORY)")
        if self.movielens is not None and (self.events.path or self.items.path):
            raise ValueError("movielens replaces events.path and items.path; give one or the "
                             "other")
        for side, features in (("query_features", self.query_features),
                               ("item_features", self.item_features)):
            names = [f.name for f in features]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{side}: feature name(s) {repeated} appear more than once")
        for feature in self.item_features:
            if feature.history is not None:
                raise ValueError(f"item_features: {feature.name!r} has a history; histories "
                                 "are query features")
        for feature in self.query_features:
            if feature.history is None and feature.name == self.events.item:
                raise ValueError(f"query_features: {feature.name!r} is the event's item (the "
                                 "answer); use it as a history feature instead")
        used = {f.table or f.name for f in self.query_features + self.item_features
                if f.kind != "dense"}
        unused = sorted(set(self.tables) - used)
        if unused:
            raise ValueError(f"tables {unused} are not used by any feature")
        return self

    @classmethod
    def from_columns(cls, columns: Columns, events: str, items: str,
                     missing_items: str = "error") -> Schema:
        """The default layout over named columns: user id and the item-key history (sharing
        the item id's table) on the query side, item id and ``id`` item features on the
        item side (what the command line's column flags describe)."""
        query = [{"name": columns.user, "kind": "id", "table": "user"}]
        if columns.history_length:
            query.append({"name": HISTORY, "kind": "id_list", "history": columns.key,
                          "length": columns.history_length, "table": "item"})
        item = [{"name": columns.key, "kind": "id", "table": "item"}]
        item += [{"name": name, "kind": "id"} for name in columns.item_features]
        return parse_schema({
            "events": {"path": str(events), "user": columns.user, "item": columns.item,
                       "time": columns.timestamp, "reward": columns.reward,
                       "ties": columns.ties},
            "items": {"path": str(items), "key": columns.key},
            "missing_items": missing_items, "query_features": query, "item_features": item},
            "--events/--items").with_base(Path())

    def columns(self) -> Columns:
        """The column roles, for :func:`~twotower.data.interactions.load_interactions`."""
        lengths = [f.length for f in self.query_features if f.length is not None]
        return Columns(user=self.events.user, item=self.events.item, timestamp=self.events.time,
                       reward=self.events.reward,
                       item_features=tuple(f.name for f in self.item_features),
                       history_length=max(lengths, default=0),
                       item_key=None if self.items.key == self.events.item else self.items.key,
                       ties=self.events.ties)

    def histories(self) -> list[HistoryFeature]:
        return [HistoryFeature(f.name, f.history, f.length) for f in self.query_features
                if f.history is not None]

    def context(self) -> list[str]:
        """Event columns the query features (and a column split) read, besides the user."""
        names = []
        for f in self.query_features:
            if f.history is None and f.name != self.events.user:
                names += [f.name] + ([f.weights] if f.weights else [])
        if self.split is not None and self.split.column is not None:
            names.append(self.split.column)
        return list(dict.fromkeys(names))

    def cleaning_steps(self) -> Cleaning:
        return Cleaning(**self.cleaning.model_dump())

    def with_base(self, base: Path) -> Schema:
        """The same schema with relative paths made relative to ``base``."""
        def resolve(path: str | None) -> str | None:
            return None if path is None else str((base / path).resolve())

        return self.model_copy(update={
            "events": self.events.model_copy(update={"path": resolve(self.events.path)}),
            "items": self.items.model_copy(update={"path": resolve(self.items.path)}),
            "movielens": resolve(self.movielens)})


def _where(location: tuple, data: object) -> str:
    """``query_features[1] ('history').kind`` from pydantic's location tuple."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
            data = data[part] if isinstance(data, list) and part < len(data) else None
            if isinstance(data, dict) and "name" in data:
                text += f" ({data['name']!r})"
        else:
            text += f".{part}" if text else str(part)
            data = data.get(part) if isinstance(data, dict) else None
    return text or "(top level)"


def parse_schema(data: object, source: str = "schema") -> Schema:
    """Validate a schema given as plain data (for example stored in a model directory)."""
    try:
        return Schema.model_validate(data)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            value = problem.get("input")
            got = "" if problem["type"] == "missing" or isinstance(value, dict | list) else \
                f" (got {value!r})"
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"  {_where(problem['loc'], data)}: {message}{got}")
        raise SchemaError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(lines)) from None


def load_schema(path: str | Path) -> Schema:
    """Read, validate and resolve a schema file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"schema file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SchemaError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: a schema is a mapping of fields (events, items, "
                          f"query_features, ...), got {type(data).__name__}")
    return parse_schema(data, str(path)).with_base(path.parent)

