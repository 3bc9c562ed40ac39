"""TFRecord files and tf.train.Example records read without TensorFlow, for prepare_data.py's MOVi converter
(README, "MOVi-C / MOVi-D / MOVi-E"): the records' framing and both CRC-32Cs, and the protobuf wire format of the
keys asked for.

    records, problem = index_tfrecord(path)            # [(offset, length), ...], None or where the framing broke
    features = decode_example(read_tfrecord_record(path, *records[0]), keys)

No maintained PyPI reader fits: `tfrecord` never checks the CRCs and parses every key with protobuf, which
MOVi's multi-megabyte optical-flow fields make slow; this reader skips the keys it is not asked for.
"""

import os
import struct

import numpy as np


class BadRecord(Exception):
    """A record that cannot be read (corrupt CRC, malformed Example): the converter reports the item and skips it."""


_CRC32C_TABLE = None  # (256,) and (65536,) uint32 tables of the reflected Castagnoli polynomial, built on first use
_CRC32C_CHUNK = 4096  # bytes per interleaved stream in the numpy CRC; about 5 ns/byte on one core
_CRC32C_SHIFT = None  # 4 x 256 table: the register after _CRC32C_CHUNK zero bytes, linear in the register's bytes


def _crc32c_tables():
    global _CRC32C_TABLE, _CRC32C_SHIFT
    if _CRC32C_TABLE is None:
        byte_table = []
        for index in range(256):
            register = index
            for _ in range(8):
                register = (register >> 1) ^ (0x82F63B78 if register & 1 else 0)
            byte_table.append(register)
        byte_table = np.array(byte_table, np.uint32)
        pair_table = np.arange(65536, dtype=np.uint32)  # register after two zero bytes, from each 16-bit register
        for _ in range(2):
            pair_table = byte_table[pair_table & 0xFF] ^ (pair_table >> 8)
        shift = (np.arange(256, dtype=np.uint32)[None] << (8 * np.arange(4, dtype=np.uint32)[:, None])).ravel()
        for _ in range(_CRC32C_CHUNK // 2):
            shift = pair_table[shift & 0xFFFF] ^ (shift >> 16)
        _CRC32C_TABLE = (byte_table.tolist(), pair_table)
        _CRC32C_SHIFT = shift.reshape(4, 256).tolist()
    return _CRC32C_TABLE, _CRC32C_SHIFT


def crc32c_numpy(data) -> int:
    """CRC-32C (Castagnoli) without a C extension: the data is cut into 4 KB chunks whose CRC registers advance
    together, two bytes per numpy step, and are then chained, using that the register update is linear."""
    (byte_table, pair_table), (shift0, shift1, shift2, shift3) = _crc32c_tables()
    data = memoryview(data).cast("B")
    register = 0xFFFFFFFF
    chunks = len(data) // _CRC32C_CHUNK
    if chunks:
        words = np.frombuffer(data, "<u2", chunks * _CRC32C_CHUNK // 2).reshape(chunks, -1).T.copy()  # (2 KB, chunks)
        registers = np.zeros(chunks, np.uint32)
        for column in words:
            registers = pair_table[(registers ^ column) & 0xFFFF] ^ (registers >> 16)
        for chunk_register in registers.tolist():  # register after a chunk = shift(register before) ^ chunk's own
            register = (shift0[register & 0xFF] ^ shift1[(register >> 8) & 0xFF] ^ shift2[(register >> 16) & 0xFF]
                        ^ shift3[register >> 24] ^ chunk_register)
    for byte in data[chunks * _CRC32C_CHUNK:]:
        register = byte_table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register ^ 0xFFFFFFFF


_CRC32C_FUNCTION = None


def _crc32c_function():
    """The optional `crc32c` package's C implementation when installed (about 100x faster), else crc32c_numpy."""
    global _CRC32C_FUNCTION
    if _CRC32C_FUNCTION is None:
        try:
            from crc32c import crc32c as _CRC32C_FUNCTION
        except ImportError:
            _CRC32C_FUNCTION = crc32c_numpy
    return _CRC32C_FUNCTION


def masked_crc32c(data, crc32c=None) -> int:
    """TFRecord's masked CRC-32C of `data`."""
    crc = (crc32c or _crc32c_function())(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def index_tfrecord(path: str):
    """Offsets and lengths of a TFRecord file's records, reading only their 12-byte headers.

    Returns ([(data offset, data length), ...], problem): problem is None for an intact file, otherwise it says
    where the framing broke (truncated file, corrupt length); the records before that point are listed."""
    size = os.path.getsize(path)
    records, offset = [], 0
    with open(path, "rb") as f:
        while offset < size:
            f.seek(offset)
            header = f.read(12)  # uint64 length | uint32 masked CRC of those 8 bytes
            if len(header) < 12:
                return records, f"truncated: {size - offset} stray bytes after record {len(records)}"
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc32c(header[:8], crc32c_numpy) != length_crc:
                return records, f"corrupt length of record {len(records)} at byte {offset}"
            end = offset + 12 + length + 4  # then data | uint32 masked CRC of the data
            if end > size:
                return records, f"truncated: record {len(records)} lacks {end - size} of its {length + 16} bytes"
            records.append((offset + 12, length))
            offset = end
    return records, None


def read_tfrecord_record(path: str, offset: int, length: int) -> memoryview:
    """One record's data, its CRC verified."""
    with open(path, "rb") as f:
        f.seek(offset)
        blob = f.read(length + 4)
    if len(blob) != length + 4:
        raise BadRecord(f"{path} is shorter than when it was indexed")
    data = memoryview(blob)[:length]
    if masked_crc32c(data) != struct.unpack_from("<I", blob, length)[0]:
        raise BadRecord("data CRC mismatch (corrupt record)")
    return data


# A tf.train.Example read straight from the protobuf wire format: Example{features=1: Features{feature=1:
# map<string, Feature>}}, Feature{oneof bytes_list=1 | float_list=2 | int64_list=3}, each list `repeated value=1`.
# Only the keys asked for are decoded, so MOVi's multi-megabyte flow fields are skipped without being parsed.

def _varint(buffer, position: int):
    result = shift = 0
    while True:
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _fields(buffer, start: int, end: int):
    """Yield (field number, wire type, value) of the message in buffer[start:end]; value is the integer of a varint,
    else the (start, end) span of the payload."""
    position = start
    while position < end:
        key, position = _varint(buffer, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(buffer, position)
        elif wire in (1, 2, 5):
            if wire == 2:
                length, position = _varint(buffer, position)
            else:
                length = 8 if wire == 1 else 4
            value = (position, position + length)
            position += length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if position > end:
            raise ValueError("protobuf field runs past the end of its message")
        yield number, wire, value


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # int64 is sent as its two's complement


def _decode_feature(buffer, start: int, end: int):
    """A Feature as a list of bytes, a float32 array or an int64 array; an empty Feature is an empty list."""
    kind, values = None, []
    for number, wire, span in _fields(buffer, start, end):
        if wire != 2 or number not in (1, 2, 3):
            continue
        if number != kind:  # oneof: a later member replaces an earlier one, the same member merges
            kind, values = number, []
        for value_number, value_wire, value in _fields(buffer, *span):
            if value_number != 1:
                continue
            if number == 1 and value_wire == 2:
                values.append(bytes(buffer[value[0]:value[1]]))
            elif number == 2 and value_wire == 2:  # packed floats
                if (value[1] - value[0]) % 4:
                    raise ValueError("packed float list length is not a multiple of 4")
                values.extend(np.frombuffer(buffer, "<f4", (value[1] - value[0]) // 4, value[0]).tolist())
            elif number == 2 and value_wire == 5:
                values.append(struct.unpack_from("<f", buffer, value[0])[0])
            elif number == 3 and value_wire == 2:  # packed varints
                position = value[0]
                while position < value[1]:
                    integer, position = _varint(buffer, position)
                    values.append(_signed64(integer))
                if position != value[1]:
                    raise ValueError("packed int64 list overruns its length")
            elif number == 3 and value_wire == 0:
                values.append(_signed64(value))
            else:
                raise ValueError(f"wire type {value_wire} in a {('bytes', 'float', 'int64')[number - 1]} list")
    if kind == 2:
        return np.array(values, np.float32)
    if kind == 3:
        return np.array(values, np.int64)
    return values


def decode_example(data, keys=None) -> dict:
    """A serialized tf.train.Example as {key: list of bytes | float32 array | int64 array}, only `keys` if given."""
    buffer = memoryview(data).cast("B")
    features = {}
    try:
        for number, wire, span in _fields(buffer, 0, len(buffer)):
            if number != 1 or wire != 2:
                continue
            for entry_number, entry_wire, entry in _fields(buffer, *span):
                if entry_number != 1 or entry_wire != 2:
                    continue
                name, value = "", None
                for part_number, part_wire, part in _fields(buffer, *entry):
                    if part_number == 1 and part_wire == 2:
                        name = bytes(buffer[part[0]:part[1]]).decode()
                    elif part_number == 2 and part_wire == 2:
                        value = part
                if keys is None or name in keys:
                    features[name] = _decode_feature(buffer, *value) if value is not None else []
    except (ValueError, IndexError, UnicodeDecodeError) as error:  # IndexError: a varint runs off the end
        raise BadRecord(f"malformed tf.train.Example ({error})") from None
    return features
