"""Where every output of a run lives, decided once (open_clip decides its run folder in one place).

    OUT/
      provenance.json           model, revision, commit, audio configuration and preprocessing, templates
      results.csv, arrays/      one row per (method, fold, key) + its confusion / per-class arrays; k-shot
                                rows too, with their `shots` and `seed` (retrieval.csv: the retrieval task's,
                                + its ranks; examples.json: per-query examples)
      summary.csv, table.md     the comparison of this run's full-data rows
      few_shot.csv              mean ± std over folds × seeds per (method, k)
      transfer.csv              zero-shot accuracy on other datasets with each fold's adapted encoder
      adapters/                 each transferable method's fitted model per fold (safetensors), for transfer
      report.md, figures/       the study's report and its pictures
      skipped.csv, warnings.csv bad files left out / suspect files used
      skipped-<target>.csv      bad files left out of a --transfer dataset
      zeroshot.csv              `audio-residual zeroshot`
      heads.csv                 unit spectra and pattern PCA of the analysis fold (copied from analysis/)
      analysis/                 `AnalysisLayout`: statistics, heads.csv, ablation.csv, summary.json, figures
      sweep.csv                 one row per finished grid point
      stats/                    PCA moments per (fold, training clips), shared by every configuration
      runs/<run key>/fold<k>/   checkpoint, λ, history, result and λ figures of one configuration on one fold
      fewshot/<k>shot-seed<s>/  sweep.csv, stats/ and runs/ of ResiDual on one k-shot draw (a layout of its own:
                                the same configuration trains on other clips there)

Every function that writes takes the output folder and asks this module for the path, so a newcomer finds
the whole layout here and a training run finds the sweep's runs by key, not by a folder-naming convention.

The cache folder (`--cache`, default `cache/`), shared by every run on the machine, is `CacheLayout`'s:

    CACHE/
      features/<config>/config.json                  the preprocessing configuration (`FeatureCache`), hashed in <config>
      features/<config>/<table>-<key>/               `FeatureStoreLayout`: one table's clips under that configuration
        input_features.npy, index.json               log-mels (row i = clip i) and each file's identity and status
        prefix-<key>/stage<s>.npy|.json|.lock        `StagePrefixLayout`: inputs of Swin stage s, keyed by model,
                                                     precision and features (`clap.stage_cache`)
      models/<sha256>-v<n>/                          a LAION `.pt` converted to a transformers folder (`clap.laion`)

Whatever else is cached gets its folder here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    """The paths of one output folder."""

    root: Path

    @classmethod
    def of(cls, out: str | Path | RunLayout) -> RunLayout:
        return out if isinstance(out, RunLayout) else cls(Path(out))

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def results(self) -> Path:
        return self.root / "results.csv"

    def results_for(self, task: str) -> Path:
        """The keyed results table of a task: results.csv (classification) or <task>.csv (retrieval.csv)."""
        return self.results if task == "classification" else self.root / f"{task}.csv"

    @property
    def examples(self) -> Path:
        return self.root / "examples.json"

    @property
    def arrays(self) -> Path:
        return self.root / "arrays"

    @property
    def summary(self) -> Path:
        return self.root / "summary.csv"

    @property
    def table(self) -> Path:
        return self.root / "table.md"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def few_shot_summary(self) -> Path:
        return self.root / "few_shot.csv"

    @property
    def transfer(self) -> Path:
        return self.root / "transfer.csv"

    def adapter(self, method: str, key: str, fold: int) -> Path:
        """The trained map of an embedding adapter on one fold; `key` is its results rows' key."""
        return self.root / "adapters" / f"{method}__{key}__fold{int(fold)}.safetensors"

    def few_shot(self, shots: int, seed: int) -> RunLayout:
        """The training outputs (sweep, statistics, runs) of one k-shot draw."""
        return RunLayout(self.root / "fewshot" / f"{int(shots)}shot-seed{int(seed)}")

    @property
    def skipped(self) -> Path:
        return self.root / "skipped.csv"

    @property
    def warnings(self) -> Path:
        return self.root / "warnings.csv"

    @property
    def zeroshot(self) -> Path:
        return self.root / "zeroshot.csv"

    @property
    def heads(self) -> Path:
        return self.root / "heads.csv"

    @property
    def analysis(self) -> AnalysisLayout:
        return AnalysisLayout(self.root / "analysis")

    @property
    def sweep(self) -> Path:
        return self.root / "sweep.csv"

    @property
    def stats(self) -> Path:
        return self.root / "stats"

    def stats_file(self, fold: int, key: str) -> Path:
        """PCA moments of fold `fold`'s training clips; `key` digests what they depend on."""
        return self.stats / f"stats_fold{fold}_{key}.safetensors"

    def run(self, key: str) -> Path:
        """One configuration's folder; `key` digests the configuration, data and model."""
        return self.root / "runs" / key

    def fold(self, key: str, fold: int) -> FoldLayout:
        return FoldLayout(self.run(key) / f"fold{fold}")


@dataclass(frozen=True)
class FoldLayout:
    """The files of one configuration trained on one fold."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.safetensors"

    @property
    def lambdas(self) -> Path:
        return self.root / "lambda.safetensors"

    @property
    def history(self) -> Path:
        return self.root / "history.csv"

    @property
    def result(self) -> Path:
        return self.root / "result.json"

    @property
    def lambda_table(self) -> Path:
        return self.root / "lambdas.csv"


@dataclass(frozen=True)
class AnalysisLayout:
    """The files of one fold's analysis (`audio-residual analyze --out DIR` writes straight into DIR)."""

    root: Path

    @classmethod
    def of(cls, out: str | Path | AnalysisLayout) -> AnalysisLayout:
        return out if isinstance(out, AnalysisLayout) else cls(Path(out))

    def stats(self, fold: int) -> Path:
        return self.root / f"stats_fold{fold}.safetensors"

    @property
    def heads(self) -> Path:
        return self.root / "heads.csv"

    @property
    def ablation(self) -> Path:
        return self.root / "ablation.csv"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def figure(self, name: str) -> Path:
        return self.root / f"{name}.png"


@dataclass(frozen=True)
class CacheLayout:
    """The paths of one cache folder (see the module docstring for the tree)."""

    root: Path

    @classmethod
    def of(cls, cache: str | Path | CacheLayout) -> CacheLayout:
        return cache if isinstance(cache, CacheLayout) else cls(Path(cache))

    @property
    def features(self) -> Path:
        """The feature cache: one folder per preprocessing configuration."""
        return self.root / "features"

    @property
    def converted_models(self) -> Path:
        """Models converted once from another format (LAION's `.pt`: `clap.laion`), one folder per file digest."""
        return self.root / "models"

    def feature_config(self, config_hash: str) -> Path:
        """The folder of one preprocessing configuration (named by its hash)."""
        return self.features / config_hash

    def feature_config_file(self, config_hash: str) -> Path:
        return self.feature_config(config_hash) / "config.json"

    def feature_store(self, config_hash: str, table: str, key: str) -> FeatureStoreLayout:
        """One table's rows under a preprocessing configuration; `key` digests its audio folder and filenames."""
        return FeatureStoreLayout(self.feature_config(config_hash) / f"{table}-{key}")


@dataclass(frozen=True)
class FeatureStoreLayout:
    """One table's cached log-mels and what is computed once from them (stage prefixes)."""

    root: Path

    @classmethod
    def holding(cls, features_file: str | Path) -> FeatureStoreLayout:
        """The store whose `features` file is `features_file` (a memory-mapped array knows its filename)."""
        return cls(Path(features_file).parent)

    @property
    def features(self) -> Path:
        return self.root / "input_features.npy"

    @property
    def index(self) -> Path:
        return self.root / "index.json"

    def stage_prefix(self, key: str) -> StagePrefixLayout:
        """Stage inputs computed from these features; `key` digests the model, precision and features."""
        return StagePrefixLayout(self.root / f"prefix-{key}")


@dataclass(frozen=True)
class StagePrefixLayout:
    """The cached inputs of each Swin stage for one (model, precision, features) key."""

    root: Path

    def hidden(self, stage: int) -> Path:
        """float32 (clips, tokens, d) array, row-aligned with the features."""
        return self.root / f"stage{int(stage)}.npy"

    def progress(self, stage: int) -> Path:
        """How many rows are filled and in which dtype the model produced them (resume point)."""
        return self.root / f"stage{int(stage)}.json"

    def lock(self, stage: int) -> Path:
        return self.root / f"stage{int(stage)}.lock"
