from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
INT8: DType

class ZooRef(_message.Message):
    __slots__ = ("name", "sha256", "size_bytes", "arch")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size_bytes: int
    arch: str
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., arch: _Optional[str] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "scale", "scales")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scale: float
    scales: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scale: _Optional[float] = ..., scales: _Optional[_Iterable[float]] = ...) -> None: ...

class Mask(_message.Message):
    __slots__ = ("layer", "width", "bits")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    width: int
    bits: bytes
    def __init__(self, layer: _Optional[str] = ..., width: _Optional[int] = ..., bits: _Optional[bytes] = ...) -> None: ...

class ClonedModule(_message.Message):
    __slots__ = ("source", "cloned_classes", "position_r", "position_s", "masks", "tensors", "config_json")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CLONED_CLASSES_FIELD_NUMBER: _ClassVar[int]
    POSITION_R_FIELD_NUMBER: _ClassVar[int]
    POSITION_S_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    source: ZooRef
    cloned_classes: _containers.RepeatedScalarFieldContainer[int]
    position_r: int
    position_s: int
    masks: _containers.RepeatedCompositeFieldContainer[Mask]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    config_json: str
    def __init__(self, source: _Optional[_Union[ZooRef, _Mapping]] = ..., cloned_classes: _Optional[_Iterable[int]] = ..., position_r: _Optional[int] = ..., position_s: _Optional[int] = ..., masks: _Optional[_Iterable[_Union[Mask, _Mapping]]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., config_json: _Optional[str] = ...) -> None: ...

class Fingerprint(_message.Message):
    __slots__ = ("probe_seed", "probe_count", "probabilities", "tolerance")
    PROBE_SEED_FIELD_NUMBER: _ClassVar[int]
    PROBE_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    probe_seed: int
    probe_count: int
    probabilities: Tensor
    tolerance: float
    def __init__(self, probe_seed: _Optional[int] = ..., probe_count: _Optional[int] = ..., probabilities: _Optional[_Union[Tensor, _Mapping]] = ..., tolerance: _Optional[float] = ...) -> None: ...

class Package(_message.Message):
    __slots__ = ("format_version", "writer_version", "target", "modules", "label_names", "fingerprint", "created_unix_s", "report_json", "name", "version", "signature")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    WRITER_VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    writer_version: str
    target: ZooRef
    modules: _containers.RepeatedCompositeFieldContainer[ClonedModule]
    label_names: _containers.RepeatedScalarFieldContainer[str]
    fingerprint: Fingerprint
    created_unix_s: float
    report_json: str
    name: str
    version: int
    signature: Signature
    def __init__(self, format_version: _Optional[int] = ..., writer_version: _Optional[str] = ..., target: _Optional[_Union[ZooRef, _Mapping]] = ..., modules: _Optional[_Iterable[_Union[ClonedModule, _Mapping]]] = ..., label_names: _Optional[_Iterable[str]] = ..., fingerprint: _Optional[_Union[Fingerprint, _Mapping]] = ..., created_unix_s: _Optional[float] = ..., report_json: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., signature: _Optional[_Union[Signature, _Mapping]] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("public_key", "signature")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    signature: bytes
    def __init__(self, public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...
