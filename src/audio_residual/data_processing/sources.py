"""What a `--data` value names: a labelled dataset (ESC-50 and kin) or captioned audio (Clotho, AudioCaps).

`esc50` is the official ESC-50, downloaded into `download_dir` once; `hf:OWNER/NAME[:config]` or a
`save_to_disk` folder is a Hugging Face dataset (audio exported under `download_dir/hf`); anything else is a
folder in one of the official layouts (`datasets.load_dataset`, `captions.load_captions`), or, with `csv`, an
audio folder listed by a `filename,label,fold` CSV.
"""

from __future__ import annotations

from pathlib import Path

from audio_residual.data_processing.captions import CaptionTable, load_captions
from audio_residual.data_processing.datasets import ClipTable, load_csv_dataset, load_dataset
from audio_residual.data_processing.download import ensure_esc50
from audio_residual.data_processing.hf import is_hf_source, load_hf_dataset

DEFAULT_DOWNLOADS = Path("data")


def resolve_dataset(data: str | Path, download_dir: Path = DEFAULT_DOWNLOADS, csv: str | Path | None = None) -> ClipTable:
    """The labelled dataset `data` names."""
    if csv is not None:
        if not Path(data).is_dir():
            raise FileNotFoundError(f"audio folder not found: {data} (--data with --csv names the audio folder)")
        return load_csv_dataset(Path(data), csv)
    if str(data).lower() in ("esc50", "esc-50"):
        return load_dataset(ensure_esc50(cache_dir=download_dir))
    if is_hf_source(data):
        return load_hf_dataset(data, export_root=download_dir / "hf")
    return load_dataset(Path(data))


def load_table(data, captions: bool = False, csv: str | Path | None = None, caption_column: str | None = None,
               download_dir: Path = DEFAULT_DOWNLOADS) -> ClipTable | CaptionTable:
    """The table `data` names: captioned audio when `captions`, else a labelled dataset; a table passes as is."""
    if isinstance(data, ClipTable | CaptionTable):
        return data
    if captions:
        if csv is not None:
            raise ValueError("--csv lists a labelled dataset; captioned audio comes as Clotho, AudioCaps, "
                             "a folder with captions.csv or hf:OWNER/NAME")
        return load_captions(data, export_root=download_dir / "hf", caption_column=caption_column)
    if caption_column is not None:
        raise ValueError("--caption-column applies to captioned audio (pretrain, retrieval)")
    return resolve_dataset(data, download_dir, csv)
