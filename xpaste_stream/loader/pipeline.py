"""The DALI pipelines: one definition each for GPU (device_id set) and CPU (device_id None).

`background_pipeline`, top to bottom, per batch of B samples:
  one sample's arrays (external source: `sample.SampleSource`, called per sample by DALI in
  worker processes, `LoaderConfig.workers`; the arrays are declared once, `wire.WIRE`)
  -> background: decode (nvJPEG on GPU) -> LSJ (one ROI resize of the part in the window,
     flip included) -> S x S window, zero padded -> (3, S, S) uint8
  -> outputs by name (`OUTPUTS`): the canvas, and the worker's pass-through arrays on the host
     (plan records, instance JPEGs and alphas, real objects' boxes and packed bits, skips).
`instance_pipeline`: one decoder call for all of a batch's instances (a variable-size batch of
  up to B x K JPEGs fed by the main process; nvJPEG on GPU), whatever K is.
The paste itself is the batched compositor on the pipelines' outputs (composite.py), on the
same device and stream.

Why this shape (2 CPU cores, 640 LSJ, U{0..19} pastes; docs/LOADER.md has the figures):
- v2 pasted inside the DALI graph, one set of operators per slot: 1,089 nodes at K = 19,
  every one scheduled each iteration, ~97 % of the CPU loader's time; on a GPU it relied on
  `fn.multi_paste` with inputs of different shapes, which DALI's tests do not cover. Here the
  graph is 5 operators (external source, decoder, resize, slice, transpose) plus one decoder
  in the instance pipeline, for any K (tests/test_compositor.py counts them).
- Every operator used here runs in the configuration DALI's own tests and examples use:
  `decoders.image` on a batch of encoded images (mixed or cpu), `resize` with an ROI, `slice`
  with padding, `transpose`; the external sources are the parallel per-sample one and a
  batch-mode one fed with `feed_input`.
- LSJ is one resize of only the part of the background that lands in the window (ROI), equal to
  resize + window + flip up to rounding (antialiased, as the original's shrink is).
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from .wire import PASSTHROUGH, WIRE

OUTPUTS = ("image", *PASSTHROUGH)        # background_pipeline's outputs, in order
INSTANCE_INPUT = "jpegs"


@pipeline_def
def background_pipeline(source, size: int, gpu: bool, workers: int, worker_prefetch: int = 4,
                        bytes_per_sample: int = 1 << 20):
    """Decode and LSJ one batch of backgrounds; `source(SampleInfo)` returns one sample's
    arrays in the order of `wire.WIRE`. With `workers` > 0 DALI calls it in that many worker
    processes (parallel external source), otherwise in the pipeline's thread."""
    parallel = {"parallel": True, "prefetch_queue_depth": worker_prefetch,
                "bytes_per_sample_hint": bytes_per_sample} if workers else {}
    outputs = fn.external_source(source=source, num_outputs=len(WIRE), batch=False, **parallel)
    inputs = dict(zip(WIRE, outputs, strict=True))
    lsj = inputs["lsj_roi"]
    image = fn.decoders.image(inputs["bg_bytes"], device="mixed" if gpu else "cpu",
                              output_type=types.RGB)
    image = large_scale_jitter(image, lsj[0:2], lsj[2:4], lsj[4:6], inputs["lsj_pad"], size)
    image = fn.transpose(image, perm=[2, 0, 1])
    return (image, *(inputs[name] for name in PASSTHROUGH))


def large_scale_jitter(image, roi_start, roi_end, out_size, pad_start, size: int):
    """LSJ as planned in one resize: only the part of the image that lands in the S x S window
    is resized (ROI; the flip is a reversed ROI), then zero padded to the window."""
    image = fn.resize(image, roi_start=roi_start, roi_end=roi_end, resize_y=out_size[0],
                      resize_x=out_size[1], interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.slice(image, start=pad_start, shape=[size, size, 3], axes=[0, 1, 2],
                    out_of_bounds_policy="pad", fill_values=0)


@pipeline_def
def instance_pipeline(gpu: bool):
    """Decode a batch of instance JPEGs (all pastes of a loader batch) in one operator."""
    jpegs = fn.external_source(name=INSTANCE_INPUT, device="cpu", dtype=types.UINT8, ndim=1)
    return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)


def graph_operators(pipe) -> list[tuple[str, str]]:
    """(operator, device) of every node of a pipeline's graph, read from its public
    serialisation (DALI's PipelineDef protobuf: ops are field 5, an op's name field 1 and its
    outputs field 3 with the device in their field 2); works without a GPU for GPU graphs."""
    ops = []
    for number, op in _proto_fields(pipe.serialize()):
        if number == 5:
            fields = list(_proto_fields(op))
            name = next(v for n, v in fields if n == 1).decode()
            outputs = [dict(_proto_fields(v)) for n, v in fields if n == 3]
            device = outputs[0].get(2, b"cpu").decode() if outputs else "cpu"
            ops.append((name, device))
    return ops


def _proto_fields(data: bytes):
    """(field number, value) of a protobuf message's top level (varints as ints, the rest as
    bytes)."""
    def varint(at):
        value = shift = 0
        while True:
            byte = data[at]
            value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
            if byte < 0x80:
                return value, at

    at = 0
    while at < len(data):
        key, at = varint(at)
        kind = key & 7
        if kind == 0:
            value, at = varint(at)
        elif kind == 2:
            n, at = varint(at)
            value, at = data[at:at + n], at + n
        else:
            n = 8 if kind == 1 else 4
            value, at = data[at:at + n], at + n
        yield key >> 3, value


@pipeline_def
def decode_only_pipeline(paths: list[str], index_paths: list[str], gpu: bool, shard_id: int = 0,
                         num_shards: int = 1):
    """A ceiling the loader is compared with: read and decode backgrounds, nothing else."""
    image = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg;png"],
                                  shard_id=shard_id, num_shards=num_shards, random_shuffle=False,
                                  name="backgrounds")
    return fn.decoders.image(image, device="mixed" if gpu else "cpu", output_type=types.RGB)


@pipeline_def
def decode_lsj_pipeline(paths: list[str], index_paths: list[str], gpu: bool, size: int,
                        scale_range: tuple[float, float] = (0.1, 2.0)):
    """The loader's ceiling: read, decode and LSJ backgrounds (longer side resized to
    S x U(scale_range), a random S x S window zero padded, a random flip), nothing else."""
    image = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=["jpg;png"],
                                  random_shuffle=False, name="backgrounds")
    image = fn.decoders.image(image, device="mixed" if gpu else "cpu", output_type=types.RGB)
    scale = fn.random.uniform(range=scale_range)
    image = fn.resize(image, resize_longer=scale * size, interp_type=types.INTERP_LINEAR,
                      antialias=True)
    image = fn.crop(image, crop=[size, size], crop_pos_x=fn.random.uniform(range=(0, 1)),
                    crop_pos_y=fn.random.uniform(range=(0, 1)), out_of_bounds_policy="pad")
    return fn.flip(image, horizontal=fn.random.coin_flip())
