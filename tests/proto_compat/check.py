#!/usr/bin/env python3
# README: proves proto/*.proto is wire-compatible with Triton's gRPC API. Usage, from the repo root:
#   deploy/setup-test-env.sh     # .venv with the pinned tritonclient[all] and grpcio-tools
#   .venv/bin/python tests/proto_compat/check.py [--proto-dir proto] [-v]
# Runs in well under a second. Exits 0 when everything matches, 1 on any mismatch; a summary is
# printed either way and its last line reads "N passed, M failed".
# Known to pass with tritonclient 2.73.0 + protobuf 6.33.6 + grpcio-tools 1.81.1 (.venv) and
# with tritonclient 2.51.0 + protobuf 4.25 + grpcio-tools 1.62.3.
"""Wire-compatibility check: sluice's proto files vs. Triton's tritonclient.

What is checked
  1. Our .proto files compile with grpc_tools.protoc (python + grpc codegen).
  2. Schema: every message / enum / field we define exists in tritonclient's
     own descriptors (tritonclient.grpc.service_pb2, model_config_pb2) with
     the same full name, field number, type, label, referenced type and oneof;
     enum values match; DataType matches upstream value-for-value.
     What Triton has beyond that (fields and enum values of messages/enums
     we define, messages and RPCs we do not serve) is fine, as long as every
     number we do define matches, and is listed as info, not as a failure.
  3. Service: exactly the 8 expected RPCs, each with the same full method
     path ("/inference.GRPCInferenceService/ModelInfer", ...), request and
     response types and streaming flags as Triton's service.
  4. Round trips, both directions, for the request/response messages of all
     8 RPCs (ModelInferRequest, ModelInferResponse, ModelMetadataResponse,
     ModelConfigResponse, ServerMetadataResponse, ModelStatisticsResponse,
     ...): a message with every one of our fields set (several variants so
     every oneof member is covered) is built with one side's classes,
     serialized, parsed with the other side's, compared field by field,
     checked for unknown (= unrecognised) fields, and re-serialized to
     byte-identical output. Our side is parsed both with classes built from
     our compiled descriptors and with the protoc-generated *_pb2 modules
     (the latter in a subprocess, because both schemas register the same
     file and symbol names and cannot share one descriptor pool).
  5. Realistic traffic: a request built by tritonclient's own request
     builder is decoded by us; a response built by us is decoded by
     tritonclient.grpc.InferResult.as_numpy; a config built by us is read
     back through Triton's classes and MessageToJson.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    from google.protobuf.descriptor import FieldDescriptor as FD
    from google.protobuf.json_format import MessageToJson
    from grpc_tools import protoc

    import tritonclient.grpc as tgrpc
    from tritonclient.grpc import _utils as tgrpc_utils
    from tritonclient.grpc import model_config_pb2 as triton_mc
    from tritonclient.grpc import service_pb2 as triton_svc
    from tritonclient.grpc import service_pb2_grpc as triton_svc_grpc
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor
except ImportError as exc:  # still end with the summary line CI looks for
    print(f"cannot import {exc.name or exc}: run deploy/setup-test-env.sh and use .venv/bin/python")
    print("0 passed, 1 failed")
    sys.exit(1)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROTO_FILES = ("grpc_service.proto", "model_config.proto")
SERVICE = "inference.GRPCInferenceService"
EXPECTED_RPCS = (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
    "ModelMetadata", "ModelInfer", "ModelConfig", "ModelStatistics",
)
KEY_MESSAGES = (
    "ModelInferRequest", "ModelInferResponse", "ModelMetadataResponse",
    "ModelConfigResponse", "ServerMetadataResponse", "ModelStatisticsResponse",
)
VARIANTS = 3


class Report:
    def __init__(self, verbose):
        self.verbose = verbose
        self.sections = []  # (name, n_checks, [errors])
        self.infos = []  # differences that are fine (Triton has more than we define)

    def section(self, name):
        entry = [name, 0, []]
        self.sections.append(entry)
        return entry

    @staticmethod
    def ok(entry, cond, msg):
        entry[1] += 1
        if not cond:
            entry[2].append(msg)
        return cond

    def info(self, msg):
        self.infos.append(msg)

    def summary(self):
        total = sum(s[1] for s in self.sections)
        failed = 0
        if self.infos:
            print(f"\n=== info: {len(self.infos)} Triton extras (fine: every number we define matches) ===")
            for msg in self.infos[: (None if self.verbose else 40)]:
                print(f"  - {msg}")
            if not self.verbose and len(self.infos) > 40:
                print(f"  ... {len(self.infos) - 40} more (use -v)")
        print("\n=== proto compat summary ===")
        for name, n, errs in self.sections:
            status = "OK  " if not errs else "FAIL"
            print(f"[{status}] {name}: {n - len(errs)}/{n} checks passed")
            for e in errs[: (None if self.verbose else 15)]:
                print(f"         - {e}")
            if errs and not self.verbose and len(errs) > 15:
                print(f"         ... {len(errs) - 15} more (use -v)")
            failed += len(errs)
        print(f"TOTAL: {total - failed}/{total} checks passed, {failed} failed")
        print(f"{total - failed} passed, {failed} failed")
        return failed == 0


# ------------------------------------------------------------------ compile

def compile_ours(proto_dir, out_dir):
    """Run protoc over our files; return (descriptor pool, out_dir)."""
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    desc_set = os.path.join(out_dir, "ours.desc")
    args = [
        "grpc_tools.protoc", f"-I{proto_dir}", f"-I{include}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
        f"--descriptor_set_out={desc_set}", "--include_imports",
        *PROTO_FILES,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed (rc={rc}) on {proto_dir}")
    fds = descriptor_pb2.FileDescriptorSet.FromString(open(desc_set, "rb").read())
    pool = descriptor_pool.DescriptorPool()
    for fdp in fds.file:  # dependencies come first with --include_imports
        pool.Add(fdp)
    return pool


# ------------------------------------------------------------------- schema

def is_repeated(f):
    # protobuf >= 6 deprecates FieldDescriptor.label in favour of is_repeated / is_required;
    # 4.x only has label.
    r = getattr(f, "is_repeated", None)
    if r is None:
        return f.label == FD.LABEL_REPEATED
    return r() if callable(r) else r


def label_name(f):
    if is_repeated(f):
        return "repeated"
    r = getattr(f, "is_required", None)
    if r is None:
        r = f.label == FD.LABEL_REQUIRED
    elif callable(r):
        r = r()
    return "required" if r else "optional"


def type_name(f):
    return {v: k[len("TYPE_"):].lower() for k, v in vars(FD).items() if k.startswith("TYPE_")}.get(f.type, f.type)


def is_map(f):
    return (f.type == FD.TYPE_MESSAGE and is_repeated(f)
            and f.message_type.GetOptions().map_entry)


def type_ref(f):
    if f.message_type is not None:
        return f.message_type.full_name
    if f.enum_type is not None:
        return f.enum_type.full_name
    return ""


def triton_pool():
    return triton_svc.DESCRIPTOR.pool  # contains model_config.proto too


def walk_messages(msg_desc):
    yield msg_desc
    for n in msg_desc.nested_types:
        yield from walk_messages(n)


def walk_enums(file_desc):
    yield from file_desc.enum_types_by_name.values()
    for top in file_desc.message_types_by_name.values():
        for m in walk_messages(top):
            yield from m.enum_types


def check_schema(rep, ours):
    sec = rep.section("schema (names, numbers, types, labels, oneofs, enums)")
    theirs = triton_pool()
    for fname in PROTO_FILES:
        fd = ours.FindFileByName(fname)
        rep.ok(sec, fd.package == "inference", f"{fname}: package {fd.package!r} != 'inference'")
        fdp = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(fdp)
        rep.ok(sec, fdp.syntax == "proto3", f"{fname}: syntax {fdp.syntax!r} != 'proto3'")
        msgs = [m for top in fd.message_types_by_name.values() for m in walk_messages(top)]
        for m in msgs:
            try:
                tm = theirs.FindMessageTypeByName(m.full_name)
            except KeyError:
                rep.ok(sec, False, f"message {m.full_name} does not exist in Triton")
                continue
            for f in m.fields:
                tf = tm.fields_by_number.get(f.number)
                if not rep.ok(sec, tf is not None, f"{f.full_name} = {f.number}: number unused in Triton"):
                    continue
                rep.ok(sec, tf.name == f.name, f"{m.full_name} #{f.number}: name {f.name!r} != Triton {tf.name!r}")
                rep.ok(sec, tf.type == f.type, f"{f.full_name}: type {f.type} != Triton {tf.type}")
                rep.ok(sec, label_name(tf) == label_name(f),
                       f"{f.full_name}: label {label_name(f)} != Triton {label_name(tf)}")
                rep.ok(sec, type_ref(tf) == type_ref(f), f"{f.full_name}: refers to {type_ref(f)!r}, Triton {type_ref(tf)!r}")
                oo = f.containing_oneof.name if f.containing_oneof else None
                too = tf.containing_oneof.name if tf.containing_oneof else None
                rep.ok(sec, oo == too, f"{f.full_name}: oneof {oo!r} != Triton {too!r}")
                rep.ok(sec, getattr(tf, "has_presence", None) == getattr(f, "has_presence", None),
                       f"{f.full_name}: presence differs from Triton")
            for tf in tm.fields:
                if tf.number not in m.fields_by_number:
                    ref = f" {type_ref(tf)}" if type_ref(tf) else ""
                    rep.info(f"{m.full_name}: Triton field {tf.name} = {tf.number} "
                             f"({label_name(tf)} {type_name(tf)}{ref}) is not defined by us")
        for e in walk_enums(fd):
            try:
                te = theirs.FindEnumTypeByName(e.full_name)
            except KeyError:
                rep.ok(sec, False, f"enum {e.full_name} does not exist in Triton")
                continue
            ours_vals = {v.name: v.number for v in e.values}
            their_vals = {v.name: v.number for v in te.values}
            for name, num in ours_vals.items():
                rep.ok(sec, their_vals.get(name) == num,
                       f"{e.full_name}.{name} = {num}, Triton has {their_vals.get(name)}")
            if e.full_name == "inference.DataType":
                rep.ok(sec, ours_vals == their_vals,
                       f"DataType must list all Triton values: missing {set(their_vals) - set(ours_vals)}")
            else:
                for name in sorted(set(their_vals) - set(ours_vals), key=their_vals.get):
                    rep.info(f"{e.full_name}: Triton value {name} = {their_vals[name]} is not defined by us")
        try:
            tfd = theirs.FindFileByName(fname)
        except KeyError:
            rep.ok(sec, False, f"{fname} is not a file in Triton's descriptor pool")
            continue
        ours_names = {m.full_name for m in msgs}
        extra = sorted(m.name for top in tfd.message_types_by_name.values() for m in walk_messages(top)
                       if m.full_name not in ours_names and not m.GetOptions().map_entry)
        if extra:
            rep.info(f"{fname}: {len(extra)} Triton messages we do not define"
                     + (f": {', '.join(extra)}" if rep.verbose else " (-v lists them)"))
    # ModelConfigResponse.config must be Triton's ModelConfig (via the import).
    cfg = ours.FindMessageTypeByName("inference.ModelConfigResponse").fields_by_name.get("config")
    rep.ok(sec, cfg is not None and cfg.message_type.file.name == "model_config.proto",
           "ModelConfigResponse.config must come from model_config.proto")


# ------------------------------------------------------------------ service

class RecordingChannel:
    """Stand-in for grpc.Channel that records the method paths a stub uses."""

    def __init__(self):
        self.paths = []

    def unary_unary(self, path, *a, **k):
        self.paths.append(path)

    unary_stream = stream_unary = stream_stream = unary_unary


def check_service(rep, ours, gen_dir):
    gen_paths = run_generated(gen_dir, {})["paths"]
    sec = rep.section("service (full method paths, request/response types, streaming)")
    theirs = triton_pool().FindServiceByName(SERVICE)
    try:
        svc = ours.FindServiceByName(SERVICE)
    except KeyError:
        rep.ok(sec, False, f"service {SERVICE} not found in our protos")
        return
    names = [m.name for m in svc.methods]
    rep.ok(sec, sorted(names) == sorted(EXPECTED_RPCS), f"RPC set {names} != expected {list(EXPECTED_RPCS)}")
    extra = [m.name for m in theirs.methods if m.name not in names]
    if extra:
        rep.info(f"{SERVICE}: {len(extra)} Triton RPCs we do not serve: {', '.join(extra)}")
    rec = RecordingChannel()
    triton_svc_grpc.GRPCInferenceServiceStub(rec)
    triton_paths = set(rec.paths)
    for m in svc.methods:
        path = f"/{svc.full_name}/{m.name}"
        rep.ok(sec, path in triton_paths, f"{path} is not a Triton method path")
        tm = theirs.methods_by_name.get(m.name)
        if not rep.ok(sec, tm is not None, f"{m.name} missing in Triton service"):
            continue
        rep.ok(sec, m.input_type.full_name == tm.input_type.full_name,
               f"{m.name}: request {m.input_type.full_name} != {tm.input_type.full_name}")
        rep.ok(sec, m.output_type.full_name == tm.output_type.full_name,
               f"{m.name}: response {m.output_type.full_name} != {tm.output_type.full_name}")
        rep.ok(sec, (m.client_streaming, m.server_streaming) == (tm.client_streaming, tm.server_streaming),
               f"{m.name}: streaming flags differ")
    # The protoc-generated stub (our grpc_service_pb2_grpc) must use the same paths.
    expected = sorted(f"/{SERVICE}/{n}" for n in EXPECTED_RPCS)
    rep.ok(sec, sorted(gen_paths) == expected, f"generated stub paths {sorted(gen_paths)} != {expected}")


# --------------------------------------------------------------- round trip

class Filler:
    """Sets every field of a message (driven by OUR descriptor) to distinct,
    non-default values, rotating oneof members; records covered fields."""

    def __init__(self, variant):
        self.n = variant * 1000
        self.oneof_turn = {}
        self.covered = set()

    def tick(self):
        self.n += 1
        return self.n

    def scalars(self, f):
        n = self.tick()
        t = f.type
        if t == FD.TYPE_BOOL:
            return [True, False, True]
        if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
            return [-(n + 1), 2**31 - 1 - n, -(2**31)]
        if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
            return [-(2**40) - n, 2**62 + n, -(2**63)]
        if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
            return [n + 1, 2**32 - 1 - n, 7]
        if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
            return [n + 1, 2**64 - 1 - n, 2**63 + 5]
        if t == FD.TYPE_FLOAT:  # exactly representable in float32
            return [n + 0.5, -(n + 0.25), 3.0e38]
        if t == FD.TYPE_DOUBLE:
            return [n + 0.1, -1.0e300, 5e-324]
        if t == FD.TYPE_STRING:
            return [f"{f.name}-{n}-\u00e9\u4e2d", f"s{n}", "x" * 200]
        if t == FD.TYPE_BYTES:
            return [bytes([0, 255, n % 256]) * 3, b"\x00", bytes(range(256))]
        if t == FD.TYPE_ENUM:
            vals = [v.number for v in f.enum_type.values if v.number != 0] or [0]
            return [vals[(n + i) % len(vals)] for i in range(3)]
        raise AssertionError(f"unhandled type {t} for {f.full_name}")

    def fill(self, msg, desc):
        for f in desc.fields:
            if f.containing_oneof is None:
                self.set(msg, f)
        for o in desc.oneofs:
            k = self.oneof_turn.get(o.full_name, 0)
            self.oneof_turn[o.full_name] = k + 1
            self.set(msg, o.fields[k % len(o.fields)])

    def set(self, msg, f):
        self.covered.add(f.full_name)
        if is_map(f):
            kf = f.message_type.fields_by_name["key"]
            vf = f.message_type.fields_by_name["value"]
            target = getattr(msg, f.name)
            for key in self.scalars(kf)[:3]:
                if vf.type == FD.TYPE_MESSAGE:
                    self.fill(target[key], vf.message_type)
                else:
                    target[key] = self.scalars(vf)[0]
        elif is_repeated(f):
            if f.type == FD.TYPE_MESSAGE:
                for _ in range(2):
                    self.fill(getattr(msg, f.name).add(), f.message_type)
            else:
                getattr(msg, f.name).extend(self.scalars(f))
        elif f.type == FD.TYPE_MESSAGE:
            sub = getattr(msg, f.name)
            sub.SetInParent()
            self.fill(sub, f.message_type)
        else:
            setattr(msg, f.name, self.scalars(f)[0])


def reachable_fields(desc, seen=None):
    seen = set() if seen is None else seen
    if desc.full_name in seen:
        return set()
    seen.add(desc.full_name)
    out = set()
    for f in desc.fields:
        out.add(f.full_name)
        if f.type == FD.TYPE_MESSAGE:
            sub = f.message_type
            if is_map(f):
                sub = sub.fields_by_name["value"].message_type
                if sub is None:
                    continue
            out |= reachable_fields(sub, seen)
    return out


def diff(a, b, desc, path, errs):
    """Field-by-field comparison of two messages, walking OUR descriptor."""
    for o in desc.oneofs:
        wa, wb = a.WhichOneof(o.name), b.WhichOneof(o.name)
        if wa != wb:
            errs.append(f"{path}: oneof {o.name} is {wa!r} vs {wb!r}")
    for f in desc.fields:
        p = f"{path}.{f.name}"
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if is_map(f):
            vf = f.message_type.fields_by_name["value"]
            if set(va.keys()) != set(vb.keys()):
                errs.append(f"{p}: map keys {sorted(va.keys())} vs {sorted(vb.keys())}")
                continue
            for k in va.keys():
                if vf.type == FD.TYPE_MESSAGE:
                    diff(va[k], vb[k], vf.message_type, f"{p}[{k!r}]", errs)
                elif va[k] != vb[k]:
                    errs.append(f"{p}[{k!r}]: {va[k]!r} vs {vb[k]!r}")
        elif is_repeated(f):
            if len(va) != len(vb):
                errs.append(f"{p}: length {len(va)} vs {len(vb)}")
            elif f.type == FD.TYPE_MESSAGE:
                for i, (x, y) in enumerate(zip(va, vb)):
                    diff(x, y, f.message_type, f"{p}[{i}]", errs)
            elif list(va) != list(vb):
                errs.append(f"{p}: {list(va)!r} vs {list(vb)!r}")
        elif f.type == FD.TYPE_MESSAGE:
            ha, hb = a.HasField(f.name), b.HasField(f.name)
            if ha != hb:
                errs.append(f"{p}: presence {ha} vs {hb}")
            elif ha:
                diff(va, vb, f.message_type, p, errs)
        elif va != vb:
            errs.append(f"{p}: {va!r} vs {vb!r}")


def unknown_bytes(msg):
    """Bytes the parser did not recognise (0 when every field was known)."""
    c = type(msg)()
    c.CopyFrom(msg)
    c.DiscardUnknownFields()
    return msg.ByteSize() - c.ByteSize()


GEN_HELPER = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
pb2 = importlib.import_module("grpc_service_pb2")
grpc_mod = importlib.import_module("grpc_service_pb2_grpc")
class Rec:
    def __init__(self): self.paths = []
    def unary_unary(self, path, *a, **k): self.paths.append(path)
    unary_stream = stream_unary = stream_stream = unary_unary
rec = Rec()
grpc_mod.GRPCInferenceServiceStub(rec)
out = {"paths": rec.paths, "reserialized": {}}
for key, (name, data) in json.load(sys.stdin).items():
    m = getattr(pb2, name).FromString(bytes.fromhex(data))
    c = type(m)(); c.CopyFrom(m); c.DiscardUnknownFields()
    out["reserialized"][key] = [m.SerializeToString(deterministic=True).hex(),
                                m.ByteSize() - c.ByteSize()]
print(json.dumps(out))
"""


def run_generated(gen_dir, payloads):
    """Parse payloads with the protoc-generated modules in a clean interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ""  # make sure only the generated code is found
    p = subprocess.run([sys.executable, "-c", GEN_HELPER, gen_dir], input=json.dumps(payloads),
                       capture_output=True, text=True, env=env, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"generated-code helper failed:\n{p.stderr}")
    return json.loads(p.stdout)


def round_trip_messages(ours):
    names = set(KEY_MESSAGES)
    svc = ours.FindServiceByName(SERVICE)
    for m in svc.methods:
        names.add(m.input_type.name)
        names.add(m.output_type.name)
    key_first = [n for n in KEY_MESSAGES] + sorted(names - set(KEY_MESSAGES))
    return key_first


def check_round_trips(rep, ours, gen_dir):
    theirs = triton_pool()
    payloads = {}
    expected = {}
    results = {}
    for name in round_trip_messages(ours):
        full = f"inference.{name}"
        odesc = ours.FindMessageTypeByName(full)
        OurCls = message_factory.GetMessageClass(odesc)
        TheirCls = message_factory.GetMessageClass(theirs.FindMessageTypeByName(full))
        sec = rep.section(f"round trip {name}")
        results[name] = sec
        covered = set()
        for variant in range(VARIANTS):
            for direction, Src, Dst in (("triton->ours", TheirCls, OurCls),
                                        ("ours->triton", OurCls, TheirCls)):
                tag = f"{direction} v{variant}"
                filler = Filler(variant)
                src = Src()
                filler.fill(src, odesc)
                covered |= filler.covered
                data = src.SerializeToString(deterministic=True)
                dst = Dst.FromString(data)
                rep.ok(sec, unknown_bytes(dst) == 0,
                       f"{tag}: {unknown_bytes(dst)} bytes not recognised by the receiver")
                errs = []
                diff(src, dst, odesc, name, errs)
                rep.ok(sec, not errs, f"{tag}: " + "; ".join(errs[:5]))
                back = dst.SerializeToString(deterministic=True)
                rep.ok(sec, back == data, f"{tag}: re-serialized bytes differ ({len(back)} vs {len(data)})")
                again = Src.FromString(back)
                rep.ok(sec, again == src, f"{tag}: second hop does not equal the original")
                if direction == "triton->ours":
                    key = f"{name}/v{variant}"
                    payloads[key] = [name, data.hex()]
                    expected[key] = data
        missing = reachable_fields(odesc) - covered
        rep.ok(sec, not missing, f"fields never exercised: {sorted(missing)}")
        rep.ok(sec, len(covered) > 0 or not odesc.fields, "nothing exercised")
        sec[0] += f" ({len(reachable_fields(odesc))} fields x {VARIANTS} variants x 2 directions)"

    # Same Triton bytes through the protoc-generated *_pb2 modules.
    gen = run_generated(gen_dir, payloads)
    for key, data in expected.items():
        name = key.split("/")[0]
        hexdata, unknown = gen["reserialized"][key]
        sec = results[name]
        rep.ok(sec, unknown == 0, f"generated {key}: {unknown} unrecognised bytes")
        rep.ok(sec, bytes.fromhex(hexdata) == data, f"generated {key}: re-serialized bytes differ")


# ----------------------------------------------------------- realistic use

def check_realistic(rep, ours):
    sec = rep.section("realistic tritonclient traffic")
    OurReq = message_factory.GetMessageClass(ours.FindMessageTypeByName("inference.ModelInferRequest"))
    OurResp = message_factory.GetMessageClass(ours.FindMessageTypeByName("inference.ModelInferResponse"))
    OurCfgResp = message_factory.GetMessageClass(ours.FindMessageTypeByName("inference.ModelConfigResponse"))

    rng = np.random.default_rng(7)
    arrays = {
        "IN_FP32": ("FP32", rng.standard_normal((2, 3)).astype(np.float32)),
        "IN_FP16": ("FP16", rng.standard_normal((4,)).astype(np.float16)),
        "IN_INT64": ("INT64", np.array([[-(2**62), 0, 2**62]], dtype=np.int64)),
        "IN_BOOL": ("BOOL", np.array([True, False, True])),
        "IN_BYTES": ("BYTES", np.array([b"hello", b"", "w\u00f6rld".encode()], dtype=np.object_)),
    }
    inputs = []
    for name, (dt, arr) in arrays.items():
        i = tgrpc.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr)
        inputs.append(i)
    outputs = [tgrpc.InferRequestedOutput("OUT0"), tgrpc.InferRequestedOutput("OUT1")]
    treq = tgrpc_utils._get_inference_request(
        model_name="m", inputs=inputs, model_version="3", request_id="req-1", outputs=outputs,
        sequence_id=42, sequence_start=True, sequence_end=False, priority=2**63 + 1, timeout=5000,
        parameters={"s": "v", "b": True, "i": -9, "f": 0.25})
    req = OurReq.FromString(treq.SerializeToString())
    rep.ok(sec, unknown_bytes(req) == 0, "tritonclient request has fields we do not know")
    rep.ok(sec, (req.model_name, req.model_version, req.id) == ("m", "3", "req-1"), "request header fields")
    p = req.parameters
    rep.ok(sec, p["sequence_id"].int64_param == 42 and p["sequence_start"].bool_param
           and p["priority"].uint64_param == 2**63 + 1 and p["timeout"].int64_param == 5000
           and p["s"].string_param == "v" and p["b"].bool_param and p["i"].int64_param == -9
           and p["f"].double_param == 0.25 and p["f"].WhichOneof("parameter_choice") == "double_param",
           f"request parameters decoded wrongly: {dict(p)}")
    rep.ok(sec, [o.name for o in req.outputs] == ["OUT0", "OUT1"], "requested outputs")
    rep.ok(sec, len(req.raw_input_contents) == len(req.inputs) == len(arrays), "one raw buffer per input")
    np_types = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "BOOL": np.bool_}
    for tensor, raw in zip(req.inputs, req.raw_input_contents):
        dt, arr = arrays[tensor.name]
        rep.ok(sec, tensor.datatype == dt and list(tensor.shape) == list(arr.shape), f"{tensor.name} header")
        if dt == "BYTES":
            got = deserialize_bytes_tensor(raw).reshape(tensor.shape)
            rep.ok(sec, got.tolist() == arr.tolist(), f"{tensor.name} payload")
        else:
            got = np.frombuffer(raw, dtype=np_types[dt]).reshape(tensor.shape)
            rep.ok(sec, np.array_equal(got, arr), f"{tensor.name} payload")

    # Response built the way sluice would build it, consumed by tritonclient.
    out0 = rng.standard_normal((2, 5)).astype(np.float32)
    out1 = np.array([b"cat", b"dog"], dtype=np.object_)
    resp = OurResp(model_name="m", model_version="3", id="req-1")
    resp.parameters["triton_final_response"].bool_param = True
    for name, dt, arr in (("OUT0", "FP32", out0), ("OUT1", "BYTES", out1)):
        t = resp.outputs.add(name=name, datatype=dt, shape=list(arr.shape))
        if dt == "BYTES":
            # same framing tritonclient uses: 4-byte LE length + bytes per element
            resp.raw_output_contents.append(serialize_byte_tensor(arr).item())
        else:
            resp.raw_output_contents.append(arr.tobytes())
        rep.ok(sec, t.name == name, "building response")
    tresp = triton_svc.ModelInferResponse.FromString(resp.SerializeToString())
    result = tgrpc.InferResult(tresp)
    rep.ok(sec, np.array_equal(result.as_numpy("OUT0"), out0), "InferResult.as_numpy(FP32) mismatch")
    rep.ok(sec, result.as_numpy("OUT1").tolist() == out1.tolist(), "InferResult.as_numpy(BYTES) mismatch")
    rj = result.get_response(as_json=True)
    rep.ok(sec, rj.get("id") == "req-1" and rj.get("model_version") == "3", f"get_response(as_json) {rj}")

    # Model config built by sluice, read by Triton's classes (as get_model_config does).
    cfg = OurCfgResp()
    c = cfg.config
    c.name, c.platform, c.backend, c.max_batch_size = "m", "onnxruntime_onnx", "sluice", 8
    c.input.add(name="IN_FP32", data_type=11, format=2, dims=[-1, 3])
    c.output.add(name="OUT0", data_type=11, dims=[5], label_filename="labels.txt")
    c.instance_group.add(name="g", kind=2, count=2)
    c.dynamic_batching.preferred_batch_size.extend([4, 8])
    c.dynamic_batching.max_queue_delay_microseconds = 100
    c.parameters["threads"].string_value = "2"
    c.model_transaction_policy.decoupled = False
    tcfg = triton_svc.ModelConfigResponse.FromString(cfg.SerializeToString())
    tc = tcfg.config
    rep.ok(sec, unknown_bytes(tcfg) == 0, "config has fields Triton does not know")
    rep.ok(sec, tc.WhichOneof("scheduling_choice") == "dynamic_batching"
           and list(tc.dynamic_batching.preferred_batch_size) == [4, 8], "dynamic batching seen by Triton")
    rep.ok(sec, tc.input[0].data_type == triton_mc.TYPE_FP32 and tc.input[0].format == triton_mc.ModelInput.FORMAT_NCHW
           and tc.instance_group[0].kind == triton_mc.ModelInstanceGroup.KIND_CPU, "enums seen by Triton")
    cj = json.loads(MessageToJson(tcfg, preserving_proto_field_name=True))["config"]
    rep.ok(sec, cj["max_batch_size"] == 8 and cj["input"][0]["dims"] == ["-1", "3"]
           and cj["input"][0]["data_type"] == "TYPE_FP32" and cj["parameters"]["threads"]["string_value"] == "2",
           f"Triton JSON view of config: {cj}")


# --------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--proto-dir", default=os.path.join(REPO, "proto"))
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    rep = Report(args.verbose)
    import tritonclient, google.protobuf, grpc_tools  # noqa: E401 (versions for the log)
    from importlib.metadata import version
    print(f"tritonclient {version('tritonclient')}, protobuf {google.protobuf.__version__}, "
          f"grpcio-tools {version('grpcio-tools')}; protos from {args.proto_dir}")
    with tempfile.TemporaryDirectory(prefix="sluice-proto-") as tmp:
        sec = rep.section("protoc codegen")
        try:
            ours = compile_ours(args.proto_dir, tmp)
        except Exception as exc:  # nothing else can run without our descriptors
            rep.ok(sec, False, f"{type(exc).__name__}: {exc}")
            sys.exit(0 if rep.summary() else 1)
        for f in ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py", "model_config_pb2.py"):
            rep.ok(sec, os.path.exists(os.path.join(tmp, f)), f"protoc did not produce {f}")
        steps = (("schema", lambda: check_schema(rep, ours)),
                 ("round trips", lambda: check_round_trips(rep, ours, tmp)),
                 ("service", lambda: check_service(rep, ours, tmp)),
                 ("realistic", lambda: check_realistic(rep, ours)))
        for label, step in steps:
            try:
                step()
            except Exception as exc:  # a crash is a failed check, not a silent pass
                Report.ok(rep.section(f"{label} (crashed)"), False, f"{type(exc).__name__}: {exc}")
    sys.exit(0 if rep.summary() else 1)


if __name__ == "__main__":
    main()
