#!/usr/bin/env bash
# Every class of bad input (issue 9), through the real nsa binary, for every subcommand it applies
# to. One function per class, `class_<name>`; tests/CMakeLists.txt registers each as the ctest
# `cli_bad_<name>` (run one: bad_inputs.sh NSA <name>). Each row, `bad CODE TEXT SUBCOMMAND ARGS`,
# checks that nsa
#   - exits with CODE (1: error, 2: usage error), which also rules out a crash (134, 139, ...),
#   - prints TEXT on stderr: the file, field or value, and what was expected,
#   - prints no sanitizer report (the ASan/UBSan build runs the same rows),
#   - leaves no output: the folder `o`, which every row names as --out, does not exist afterwards.
# A new subcommand adds its rows to the classes that apply to it.
source "$(dirname "$0")/lib.sh"
CLASS=${2:?usage: bad_inputs.sh NSA CLASS}

bad() {
  local code=$1 text=$2 sub=$3; shift 3
  rm -rf o
  refused "$code" "$text" "$NSA" "$sub" "$@"
  [ ! -e o ] || fail "a failed run left its output folder o/ ($(ls -A o | tr '\n' ' ')): nsa $sub $*"
}

# Workloads: a sequence of 64 tokens, Hq = 4, Hkv = 2, dk = 16, dv = 8, gates; and a batch [2, 32].
ok "$NSA" gen --T 64 --Hq 4 --Hkv 2 --dk 16 --dv 8 --gates random --out w
ok "$NSA" gen --T 32 --B 2 --Hq 4 --Hkv 2 --dk 16 --dv 8 --gates random --out wb
IN="--q w/q.npy --k w/k.npy --v w/v.npy"
SMALL="--cmp-len 8 --cmp-stride 4 --slc-len 8 --slc-count 4 --window 16"

class_missing_file() {
  bad 1 "--q missing.npy: cannot open file (No such file or directory)" forward --q missing.npy --k w/k.npy --v w/v.npy --out o
  bad 1 "--k-win missing.npy: cannot open file (No such file or directory)" forward $IN --k-win missing.npy --out o
  bad 1 "--v missing.npy: cannot open file (No such file or directory)" full --q w/q.npy --k w/k.npy --v missing.npy --out o
  bad 1 "--k missing.npy: cannot open file (No such file or directory)" decode --q w/q.npy --k missing.npy --v w/v.npy --out o
  bad 1 "--gates missing.npy: cannot open file" forward $IN --gates missing.npy --out o
  bad 1 "--cu-seqlens missing.npy: cannot open file" forward $IN --cu-seqlens missing.npy --out o
  bad 1 "--q w: is a folder, expected a .npy file" forward --q w --k w/k.npy --v w/v.npy --out o
  bad 1 "--compress-params nodir: not a folder" forward $IN --compress linear --compress-params nodir --out o
  mkdir -p emptydir
  bad 1 "--compress-params emptydir/pe_k.npy: cannot open file" forward $IN --compress mlp --compress-params emptydir --out o
  bad 1 "missing.ini: cannot open config file" forward $IN --config missing.ini --out o
  bad 1 "missing.npy: no such file or folder" compare w/q.npy missing.npy
  bad 1 "nodir: no such file or folder" compare nodir w
  bad 1 "compare a file with a file or a folder with a folder: w/q.npy and w" compare w/q.npy w
  bad 1 "--block-idx missing.npy: cannot open file (No such file or directory)" simulate --block-idx missing.npy --out o
}

class_not_npy() {
  bad 1 "--q w/config.json: not a .npy file (the magic string \\x93NUMPY is missing)" forward --q w/config.json --k w/k.npy --v w/v.npy --out o
  : >empty.npy
  bad 1 "--k empty.npy: not a .npy file" forward --q w/q.npy --k empty.npy --v w/v.npy --out o
  bad 1 "--k empty.npy: not a .npy file" full --q w/q.npy --k empty.npy --v w/v.npy --out o
  bad 1 "--v empty.npy: not a .npy file" decode --q w/q.npy --k w/k.npy --v empty.npy --out o
  cp w/q.npy v9.npy && printf '\x09' | dd of=v9.npy bs=1 seek=6 conv=notrunc status=none
  bad 1 "--q v9.npy: unsupported .npy format version 9; expected 1, 2 or 3" forward --q v9.npy --k w/k.npy --v w/v.npy --out o
  bad 1 "w/config.json: not a .npy file" compare w/config.json w/q.npy
  bad 1 "--block-idx w/config.json: not a .npy file" simulate --block-idx w/config.json --out o
}

class_truncated() {
  head -c 1000 w/q.npy >short.npy
  bad 1 "--q short.npy: truncated data: shape [64, 4, 16] of float32 needs 16384 bytes, the file holds 872" \
    forward --q short.npy --k w/k.npy --v w/v.npy --out o
  head -c 40 w/q.npy >head.npy
  bad 1 "--q head.npy: truncated .npy header (118 bytes announced, 30 present)" full --q head.npy --k w/k.npy --v w/v.npy --out o
  # A header announcing a billion tokens over 100 bytes: refused from the header, nothing allocated.
  mknpy claims.npy '<f4' False '(1000000000, 4, 16)' 100
  bad 1 "--q claims.npy: truncated data: shape [1000000000, 4, 16] of float32 needs 256000000000 bytes, the file holds 100" \
    forward --q claims.npy --k w/k.npy --v w/v.npy --out o
  bad 1 "short.npy: truncated data" compare short.npy w/q.npy
  bad 1 "--q short.npy: truncated data" decode --q short.npy --k w/k.npy --v w/v.npy --out o
}

class_corrupted() {
  cat w/q.npy >long.npy && printf 'xx' >>long.npy
  bad 1 "--q long.npy: corrupted file: 2 bytes beyond the data that shape [64, 4, 16] of float32 holds" \
    forward --q long.npy --k w/k.npy --v w/v.npy --out o
  mknpy badshape.npy '<f4' False '(64, x, 16)' 0
  bad 1 "--q badshape.npy: bad shape '(64, x, 16)': 'x' is not a non-negative integer" forward --q badshape.npy --k w/k.npy --v w/v.npy --out o
  mknpy negshape.npy '<f4' False '(-64, 4, 16)' 0
  bad 1 "--q negshape.npy: bad shape '(-64, 4, 16)': '-64' is not a non-negative integer" full --q negshape.npy --k w/k.npy --v w/v.npy --out o
  mknpy overflow.npy '<f8' False '(99999999999999, 99999999999999, 9999)' 0
  bad 1 "--k overflow.npy: shape [99999999999999, 99999999999999, 9999] is too large" forward --q w/q.npy --k overflow.npy --v w/v.npy --out o
  mknpy fortranval.npy '<f4' Maybe '(64, 4, 16)' 16384
  bad 1 "--q fortranval.npy: bad 'fortran_order' value 'Maybe'" forward --q fortranval.npy --k w/k.npy --v w/v.npy --out o
  bad 1 "long.npy: corrupted file" compare w/q.npy long.npy
}

class_dtype() {
  mknpy c8.npy '<c8' False '(64, 4, 16)' 32768
  bad 1 "--q c8.npy: unsupported dtype '<c8'; expected float64, float32, float16, int32 or int64" forward --q c8.npy --k w/k.npy --v w/v.npy --out o
  mknpy b1.npy '|b1' False '(64, 4, 3)' 768
  bad 1 "--gates b1.npy: unsupported dtype '|b1'" forward $IN --gates b1.npy --out o
  mknpy u1.npy '|u1' False '(64, 2, 8)' 1024
  bad 1 "--v u1.npy: unsupported dtype '|u1'" full --q w/q.npy --k w/k.npy --v u1.npy --out o
  mknpy i4.npy '<i4' False '(64, 4, 16)' 16384
  bad 1 "--q i4.npy: dtype int32 where a floating-point tensor (float64, float32 or float16) is expected" \
    forward --q i4.npy --k w/k.npy --v w/v.npy --out o
  mknpy cuf.npy '<f8' False '(2,)' 16
  bad 1 "--cu-seqlens cuf.npy: dtype float64 where an integer tensor (int32 or int64) is expected" forward $IN --cu-seqlens cuf.npy --out o
  bad 1 "c8.npy: unsupported dtype '<c8'" compare c8.npy c8.npy
  bad 1 "--block-idx w/q.npy: dtype float32 where an integer tensor (int32 or int64) is expected" simulate --block-idx w/q.npy --out o
  # float16 is accepted.
  mknpy f2.npy '<f2' False '(64, 4, 16)' 8192
  rm -rf o && ok "$NSA" forward --q f2.npy --k w/k.npy --v w/v.npy --out o
}

class_big_endian() {
  mknpy be.npy '>f4' False '(64, 4, 16)' 16384
  bad 1 "--q be.npy: big-endian data ('>f4') is not supported; save it little-endian" forward --q be.npy --k w/k.npy --v w/v.npy --out o
  mknpy be8.npy '>f8' False '(64, 2, 8)' 8192
  bad 1 "--v be8.npy: big-endian data ('>f8') is not supported" full --q w/q.npy --k w/k.npy --v be8.npy --out o
  bad 1 "be.npy: big-endian data" compare be.npy w/q.npy
}

class_fortran_order() {
  mknpy fo.npy '<f4' True '(64, 2, 16)' 8192
  bad 1 "--k fo.npy: Fortran-order data is not supported; save a C-order array (np.ascontiguousarray)" \
    forward --q w/q.npy --k fo.npy --v w/v.npy --out o
  bad 1 "--k fo.npy: Fortran-order data is not supported" full --q w/q.npy --k fo.npy --v w/v.npy --out o
  bad 1 "fo.npy: Fortran-order data is not supported" compare fo.npy w/k.npy
}

class_shape_mismatch() {
  ok "$NSA" gen --T 32 --Hq 4 --Hkv 2 --dk 16 --dv 8 --out w32
  bad 1 "--k w32/k.npy: shape [32, 2, 16], expected [N = 64, Hkv, dk] like --q" forward --q w/q.npy --k w32/k.npy --v w/v.npy --out o
  bad 1 "--k-cmp w32/k.npy: shape [32, 2, 16], expected [N = 64, Hkv, dk] like --q" forward $IN --k-cmp w32/k.npy --out o
  bad 1 "--v w32/v.npy: shape [32, 2, 8], expected [N = 64, Hkv, dv] like --q" full --q w/q.npy --k w/k.npy --v w32/v.npy --out o
  bad 1 "--k-win w32/k.npy: shape [32, 2, 16], expected [N = 64, Hkv, dk] like --q" decode $IN --k-win w32/k.npy --out o
  mknpy bi2.npy '<i4' False '(64, 4)' 1024
  bad 1 "--block-idx bi2.npy: shape [64, 4] is not [T, Hkv, n] or [B, T, Hkv, n]" simulate --block-idx bi2.npy --out o
  bad 1 "--k w/v.npy: shape [64, 2, 8], expected [64, 2, 16] ([N, Hkv, dk], N as in q)" forward --q w/q.npy --k w/v.npy --v w/v.npy --out o
  bad 1 "--v-slc w/k.npy: shape [64, 2, 16], expected [64, 2, 8] ([N, Hkv, dv] like v)" forward $IN --v-slc w/k.npy --out o
  bad 1 "--gates w/q.npy: shape [64, 4, 16], expected [64, 4, 3] ([N, Hq, 3] in the order cmp, slc, win)" forward $IN --gates w/q.npy --out o
  mknpy q2.npy '<f4' False '(64, 64)' 16384
  bad 1 "--q q2.npy: rank 2 (shape [64, 64]), expected [T, Hq, dk] or [B, T, Hq, dk]" forward --q q2.npy --k w/k.npy --v w/v.npy --out o
  # A batch [B, T, H, D]: the other tensors must be batches of the same B and T.
  bad 1 "--k w/k.npy: rank 3 (shape [64, 2, 16]), expected [B = 2, T = 32, Hkv, dk] like --q" forward --q wb/q.npy --k w/k.npy --v wb/v.npy --out o
  ok "$NSA" gen --T 16 --B 2 --Hq 4 --Hkv 2 --dk 16 --dv 8 --out wb16
  bad 1 "--v wb16/v.npy: shape [2, 16, 2, 8], expected [B = 2, T = 32, Hkv, dv] like --q" full --q wb/q.npy --k wb/k.npy --v wb16/v.npy --out o
  bad 1 "--cu-seqlens is for packed [N, H, D] inputs, but --q wb/q.npy is a batch [2, 32, 4, 16]" \
    forward --q wb/q.npy --k wb/k.npy --v wb/v.npy --cu-seqlens cu.npy --out o
  # Packed sequences: offsets from 0 to N, non-decreasing.
  mknpy cu0.npy '<i8' False '(2,)' 16
  bad 1 "--cu-seqlens cu0.npy: must start at 0 and end at N = 64 (2 offsets, first 0, last 0)" forward $IN --cu-seqlens cu0.npy --out o
  mknpy cu1.npy '<i8' False '(1,)' 8
  bad 1 "--cu-seqlens cu1.npy: 1 offsets; expected B+1 >= 2 (0, ..., N = 64)" full $IN --cu-seqlens cu1.npy --out o
  # phi's parameters from files: pe_k must be [Hkv, l, dk].
  mkdir -p phi
  mknpy phi/pe_k.npy '<f4' False '(2, 5, 16)' 640
  mknpy phi/w_k.npy '<f4' False '(2, 16, 128)' 16384
  mknpy phi/b_k.npy '<f4' False '(2, 16)' 128
  mknpy phi/pe_v.npy '<f4' False '(2, 8, 8)' 512
  mknpy phi/w_v.npy '<f4' False '(2, 8, 64)' 4096
  mknpy phi/b_v.npy '<f4' False '(2, 8)' 64
  bad 1 "--compress-params phi/pe_k.npy: shape [2, 5, 16], expected [2, 8, 16] ([Hkv, l, D])" \
    forward $IN $SMALL --compress linear --compress-params phi --out o
  # compare: different shapes are a FAIL, not an error.
  bad 1 "" compare w/q.npy w/k.npy
  contains out.txt "FAIL q.npy  shape [64, 4, 16] vs [64, 2, 16]"
}

class_heads_not_divisible() {
  ok "$NSA" gen --T 64 --Hq 3 --Hkv 3 --dk 16 --dv 8 --out w3
  bad 1 "head counts: --q w/q.npy has Hq = 4 query heads, --k w3/k.npy has Hkv = 3 key/value heads; expected Hq a multiple of Hkv" \
    forward --q w/q.npy --k w3/k.npy --v w3/v.npy --out o
  bad 1 "head counts: --q w3/q.npy has Hq = 3 query heads, --k w/k.npy has Hkv = 2" full --q w3/q.npy --k w/k.npy --v w/v.npy --out o
  bad 1 "head counts: --q w/q.npy has Hq = 4 query heads, --k w3/k.npy has Hkv = 3" decode --q w/q.npy --k w3/k.npy --v w3/v.npy --out o
  bad 1 "Hq = 6 is invalid: expected a multiple of Hkv = 4" gen --Hq 6 --Hkv 4 --out o
  bad 1 "Hq = 6 is invalid: expected a multiple of Hkv = 4" simulate --selection random --Hq 6 --Hkv 4 --out o
  bad 1 "tile heads = 5 must divide G = 16" simulate --selection random --T 64 --tile-heads 5 --out o
  bad 1 "Hq (query heads) = 5 is invalid: expected a multiple of Hkv = 2 (GQA groups)" bench --T 64 --Hq 5 --Hkv 2 --out o
  mknpy q0.npy '<f4' False '(64, 0, 16)' 0
  bad 1 "--q q0.npy: shape [64, 0, 16] has Hq = 0 heads of dk = 16; expected Hq >= 1 and dk >= 1" forward --q q0.npy --k w/k.npy --v w/v.npy --out o
  mknpy k0.npy '<f4' False '(64, 0, 16)' 0
  bad 1 "--k k0.npy: shape [64, 0, 16] has Hkv = 0 key/value heads" full --q w/q.npy --k k0.npy --v w/v.npy --out o
}

class_nonfinite() {
  cp w/q.npy qnan.npy && poke qnan.npy 70 0000c07f  # q[1, 0, 6] = NaN
  bad 1 "--q qnan.npy: non-finite value nan at index [1, 0, 6] (the first; pass --allow-nonfinite to let NaN/Inf through)" \
    forward --q qnan.npy --k w/k.npy --v w/v.npy --out o
  bad 1 "--q qnan.npy: non-finite value nan at index [1, 0, 6]" full --q qnan.npy --k w/k.npy --v w/v.npy --out o
  cp w/v.npy vinf.npy && poke vinf.npy 200 0000807f  # v[12, 1, 0] = +Inf
  bad 1 "--v vinf.npy: non-finite value inf at index [12, 1, 0]" forward --q w/q.npy --k w/k.npy --v vinf.npy --out o
  cp wb/k.npy kninf.npy && poke kninf.npy 1100 000080ff  # the batch's k[1, 2, 0, 12] = -Inf: the file's own index
  bad 1 "--k kninf.npy: non-finite value -inf at index [1, 2, 0, 12]" forward --q wb/q.npy --k kninf.npy --v wb/v.npy --out o
  cp w/gates.npy gnan.npy && poke gnan.npy 5 0000c07f
  bad 1 "--gates gnan.npy: non-finite value nan at index [0, 1, 2]" forward $IN --gates gnan.npy --out o
  bad 1 "--q qnan.npy: non-finite value nan at index [1, 0, 6]" decode --q qnan.npy --k w/k.npy --v w/v.npy --prefill 10 --out o
  # --allow-nonfinite: they propagate, and only where the spec says. q[1, 0] sees no compressed
  # block (t < l - 1), so its NaN reaches exactly o[1, 0, :] (dv = 8 values); all else is equal.
  ok "$NSA" forward $IN --out clean
  rm -rf o && ok "$NSA" forward --q qnan.npy --k w/k.npy --v w/v.npy --allow-nonfinite --out o
  refused 1 "" "$NSA" compare o/o.npy clean/o.npy --rtol 0 --atol 0
  contains out.txt "max_abs 0  rel_l2 0  8 NaN/Inf mismatches, first at [1, 0, 0]"
  rm -rf o && ok "$NSA" full --q qnan.npy --k w/k.npy --v w/v.npy --allow-nonfinite --out o
  rm -rf o && ok "$NSA" decode --q qnan.npy --k w/k.npy --v w/v.npy --prefill 10 --allow-nonfinite --out o
  # A NaN key reaches the block scores of later queries: selection still picks n blocks (NaN
  # scores rank last), in both paths and precisions.
  cp w/k.npy knan.npy && poke knan.npy 1000 0000c07f  # k[31, 0, 8]
  for extra in "" "--path oracle" "--precision float"; do
    rm -rf o && ok "$NSA" forward --q w/q.npy --k knan.npy --v w/v.npy $SMALL --allow-nonfinite $extra --out o
  done
  rm -rf o && ok "$NSA" forward $IN --gates gnan.npy --allow-nonfinite --out o
}

class_invalid_config() {
  # NSA settings: d > l, n below the forced blocks, zero and negative sizes, bad scales.
  bad 1 "cmp_stride (d) = 40 is invalid: expected 1 <= d <= cmp_len (l) = 32" forward $IN --cmp-stride 40 --out o
  bad 1 "slc_count (n) = 2 is invalid: expected >= init_blocks + local_blocks = 3 (forced blocks are counted within n)" forward $IN --slc-count 2 --out o
  bad 1 "cmp_len (l) = 0 is invalid: expected >= 1" forward $IN --cmp-len 0 --out o
  bad 1 "cmp_stride (d) = 0 is invalid: expected 1 <= d <= cmp_len (l) = 32" forward $IN --cmp-stride 0 --out o
  bad 1 "slc_len (l') = -64 is invalid: expected >= 1" forward $IN --slc-len -64 --out o
  bad 1 "window (w) = 0 is invalid: expected >= 1" forward $IN --window 0 --out o
  bad 1 "init_blocks = -1 is invalid: expected >= 0" forward $IN --init-blocks -1 --out o
  bad 1 "cmp_hidden (h_c) = -3 is invalid" forward $IN --cmp-hidden -3 --out o
  bad 1 "scale = -1 is invalid: expected a finite value > 0 (or 0 for 1/sqrt(dk))" full $IN --scale -1 --out o
  bad 1 "scale = nan is invalid" forward $IN --scale nan --out o
  # Unknown options and values.
  bad 2 "unrecognised option '--windw'" forward $IN --windw 3 --out o
  bad 2 "unrecognised option '--gates'" full $IN --gates w/gates.npy --out o
  bad 2 "the argument ('abc') for option '--window' is invalid" forward $IN --window abc --out o
  bad 2 "too many positional options" forward $IN extra --out o
  bad 2 "unknown subcommand 'fwd'" fwd $IN --out o
  bad 1 "compress = 'pool' is not one of: mean, linear, mlp" forward $IN --compress pool --out o
  bad 1 "--cmp-act: activation = 'tanh' is not one of: gelu, gelu_tanh, relu, silu" forward $IN --cmp-act tanh --out o
  bad 1 "--gate-act: activation = 'foo' is not one of" forward $IN --gate-act foo --out o
  bad 1 "precision = 'half' is not one of: double, float" forward $IN --precision half --out o
  bad 1 "path = 'slow' is not one of: fast, oracle" full $IN --path slow --out o
  bad 1 "device = 'tpu' is not one of: cpu, cuda" forward $IN --device tpu --out o
  bad 1 "dtype = 'bf17' is not one of: bf16, fp16, fp32" forward $IN --dtype bf17 --out o
  bad 1 "threads = -1 is invalid: expected 0 (all cores) to 1024" forward $IN --threads -1 --out o
  bad 1 "threads = 5000 is invalid" full $IN --threads 5000 --out o
  bad 1 "variant = 'v4' is not one of: auto, fp32, mma, cublas" forward $IN --variant cmp_attn=v4 --out o
  bad 1 "stage = 'select' is not one of: phi, cmp_attn, topn" forward $IN --variant select=mma --out o
  bad 1 "item 'slc_attn' is not STAGE=VARIANT" backward $IN --do w/do.npy --variant slc_attn --out o
  bad 1 "item 'topn=9' is not STAGE=N with N in 0..8" forward $IN --warps topn=9 --out o
  bad 1 "bwd-variant = 'cublas' is not one of: auto, fp32, mma" backward $IN --do w/do.npy --bwd-variant cublas --out o
  bad 1 "dec-kernel = 4 is invalid: expected 1, 2, 3 or -1" decode $IN --dec-kernel 4 --out o
  bad 1 "threads = -1 is invalid" decode $IN --threads -1 --out o
  bad 1 "prefill = -1 is invalid: expected >= 0 tokens" decode $IN --prefill -1 --out o
  bad 1 "slc_count (n) = 2 is invalid" decode $IN --slc-count 2 --out o
  bad 2 "unrecognised option '--prefil'" decode $IN --prefil 3 --out o
  # Required options, and the gate MLP's parts.
  bad 2 "the option '--out' is required" forward $IN
  bad 2 "the option '--k' is required" full --q w/q.npy --v w/v.npy --out o
  bad 2 "the gate MLP needs --gate-x, --gate-w and --gate-b; --gate-w is missing" forward $IN --gate-x w/q.npy --gate-b w/v.npy --out o
  bad 2 "give either --gates or the gate MLP" forward $IN --gates w/gates.npy --gate-w w/q.npy --out o
  bad 2 "the gate MLP's hidden layer needs both --gate-w0 and --gate-b0" forward $IN --gate-x w/q.npy --gate-w w/q.npy --gate-b w/v.npy --gate-w0 w/k.npy --out o
  # Options that would be silently ignored are refused.
  bad 2 "--compress mean has no parameters; --compress-params is not used" forward $IN --compress mean --compress-params w --out o
  # An INI file is held to the same rules as the command line.
  printf 'windw = 3\n' >typo.ini
  bad 2 "typo.ini: unrecognised option 'windw'" forward $IN --config typo.ini --out o
  printf 'window = -3\n' >neg.ini
  bad 1 "window (w) = -3 is invalid" forward $IN --config neg.ini --out o
  # gen, bench, compare.
  bad 1 "T = 0 is invalid: expected >= 1" gen --T 0 --out o
  bad 1 "T = -5 is invalid: expected >= 1" gen --T -5 --out o
  bad 1 "B = -1 is invalid: expected >= 0 (0: one unbatched sequence)" gen --B -1 --out o
  bad 1 "dk = 0 is invalid: expected >= 1" gen --dk 0 --out o
  bad 1 "workload = 'needles' is not one of" gen --workload needles --out o
  bad 1 "dtype = 'float16' is not one of: float32, float64" gen --dtype float16 --out o
  bad 1 "T = 0 is invalid: expected >= 1" bench --T 0 --out o
  bad 1 "T: 'abc' in 'abc' is not a valid value" bench --T abc --out o
  bad 1 "reps = 0, warmup = 1: expected reps >= 1, warmup >= 0" bench --T 64 --reps 0 --out o
  bad 1 "precisions: 'half' is not one of: float, double" bench --T 64 --precisions half --out o
  bad 1 "cmp_stride (d) = 40 is invalid" bench --T 64 --cmp-stride 40 --out o
  bad 2 "--seed is not used" bench --T 64 --seed 3 --out o
  bad 2 "--compress-params is not used" bench --T 64 --compress-params phi --out o
  bad 1 "rtol = -1 is invalid: expected a finite value >= 0" compare w/q.npy w/q.npy --rtol -1
  bad 1 "atol = nan is invalid" compare w/q.npy w/q.npy --atol nan
  bad 1 "metric = 'l1' is not one of: allclose, rel_l2" compare w/q.npy w/q.npy --metric l1
  bad 2 "give two paths: A (to check) and B (the reference)" compare w/q.npy
  bad 2 "too many positional options" compare w/q.npy w/q.npy w/q.npy
  # simulate.
  bad 1 "T = 0 is invalid: expected >= 1" simulate --selection random --T 0 --out o
  bad 1 "corr_len = 0 is invalid" simulate --selection clustered --T 64 --corr-len 0 --out o
  bad 1 "sample = -1: expected >= 0 (0: automatic)" simulate --selection random --T 64 --sample -1 --out o
  bad 1 "tiles per CTA = 0: expected >= 1" simulate --selection random --T 64 --tiles-per-cta 0 --out o
  bad 1 "copy-tbs = -1: expected a number > 0" simulate --selection random --T 64 --copy-tbs -1 --out o
  bad 1 "cache policy = 'plru' is not one of: lru, fifo, random" simulate --selection random --T 64 --l2-policy plru --out o
  bad 1 "branch = 'full' is not one of: cmp, slc, win" simulate --selection random --T 64 --branches slc,full --out o
  bad 1 "slc_count (n) = 2 is invalid" simulate --selection random --T 64 --slc-count 2 --out o
  bad 2 "give one of --block-idx FILE or --selection" simulate --out o
  bad 2 "--generate-only draws a selection: give --selection" simulate --block-idx w/q.npy --generate-only --out o
}

class_memory() {
  # Requests beyond the machine's memory are refused before anything is allocated, naming the
  # bytes needed and available. A billion tokens, generated:
  bad 1 "not enough memory: this run needs 9216000000000 bytes (9.22 TB: tensors in double 9.22 TB" \
    gen --T 1000000000 --Hq 16 --Hkv 1 --dk 64 --dv 64 --dtype float64 --out o
  contains err.txt ") are available ("
  # ... and as files whose headers announce them (sparse files: no disk is used).
  mknpy bq.npy '<f4' False '(1000000000, 4, 16)' 256000000000
  mknpy bk.npy '<f4' False '(1000000000, 2, 16)' 128000000000
  mknpy bv.npy '<f4' False '(1000000000, 2, 8)' 64000000000
  bad 1 "not enough memory: this run needs 1152032182016 bytes (1.15 TB: inputs 1.15 TB, runtime 32 MB), but" forward --q bq.npy --k bk.npy --v bv.npy --out o
  bad 1 "not enough memory: this run needs 1152032000000 bytes (1.15 TB: inputs 1.15 TB, runtime 32 MB), but" full --q bq.npy --k bk.npy --v bv.npy --out o
  bad 1 "not enough memory: this run needs 1152032182016 bytes" decode --q bq.npy --k bk.npy --v bv.npy --out o
  bad 1 "not enough memory: this run needs 1536000000000 bytes (1.54 TB: the two files 512 GB, their values in 8 bytes each 1.02 TB)" \
    compare bq.npy bq.npy
  # Small inputs, large outputs or parameters: 10^8 selected blocks per query; a block length
  # of 10^8 makes phi's drawn parameters (w1: [Hkv, h_c, l*D]) 5.5e11 bytes.
  bad 1 "not enough memory: this run needs" forward $IN --slc-len 1 --slc-count 100000000 --init-blocks 0 --local-blocks 0 --out o
  contains err.txt "outputs 51.2 GB"
  bad 1 "not enough memory: this run needs" forward $IN --cmp-len 100000000 --out o
  contains err.txt "inputs 550 GB"
  bad 1 "not enough memory: this run needs" bench --T 10000000 --out o
  bad 1 "not enough memory: this run needs" simulate --selection random --T 10000000000 --out o
  mknpy bbi.npy '<i4' False '(1000000000, 4, 16)' 256000000000
  bad 1 "not enough memory: this run needs" simulate --block-idx bbi.npy --out o
  # NSA_MAX_MEMORY caps what nsa may plan to use: a small run refused below its estimate.
  NSA_MAX_MEMORY=100000 bad 1 "are available (the environment variable NSA_MAX_MEMORY)" forward $IN --out o
  NSA_MAX_MEMORY=lots bad 1 "NSA_MAX_MEMORY = 'lots' is invalid: expected a number of bytes" forward $IN --out o
}

class_overflow() {
  # Finite inputs whose logits overflow float: q[40, 0, :] and k[40, 0, :] = 1e30, so
  # s q.k = 4e60. Refused in float, naming the first non-finite output; exact in double.
  cp w/q.npy qbig.npy && cp w/k.npy kbig.npy
  for i in $(seq 0 15); do poke qbig.npy $((40 * 64 + i)) caf24971 && poke kbig.npy $((40 * 32 + i)) caf24971; done
  bad 1 "although every input is finite: the float arithmetic overflowed (inputs too large; try --precision double)" \
    forward --q qbig.npy --k kbig.npy --v w/v.npy --precision float --out o
  bad 1 "o at index [40, 0, 0] is nan although every input is finite" full --q qbig.npy --k kbig.npy --v w/v.npy --precision float --out o
  bad 1 "although every input is finite: the float arithmetic overflowed" decode --q qbig.npy --k kbig.npy --v w/v.npy --precision float --prefill 20 --out o
  rm -rf o && ok "$NSA" forward --q qbig.npy --k kbig.npy --v w/v.npy --out o
  # A float64 value beyond float's range is refused for --precision float.
  ok "$NSA" gen --T 64 --Hq 4 --Hkv 2 --dk 16 --dv 8 --dtype float64 --out w64
  poke w64/v.npy 17 9c7500883ce4377e  # v[1, 0, 1] = 1e300
  bad 1 "--v w64/v.npy: value 1e+300 at index [1, 0, 1] does not fit in float (|x| <= 3.4e38); use --precision double" \
    forward --q w64/q.npy --k w64/k.npy --v w64/v.npy --precision float --out o
}

class_existing_output() {
  # A failed run leaves an existing output folder as it was, and removes the folders it made.
  ok "$NSA" forward $IN --out prev
  ls -A prev >before.txt && md5sum prev/* >before.md5
  refused 1 "cmp_stride (d) = 40 is invalid" "$NSA" forward $IN --cmp-stride 40 --out prev
  ls -A prev | diff before.txt - >/dev/null || fail "a failed run changed the files of prev/"
  md5sum -c --quiet before.md5 || fail "a failed run changed the contents of prev/"
  # It fails after computing (an overflow found in the outputs): new/sub/ is made and removed.
  cp w/q.npy qbig.npy && cp w/k.npy kbig.npy
  for i in $(seq 0 15); do poke qbig.npy $((40 * 64 + i)) caf24971 && poke kbig.npy $((40 * 32 + i)) caf24971; done
  refused 1 "the float arithmetic overflowed" "$NSA" forward --q qbig.npy --k kbig.npy --v w/v.npy --precision float --out new/sub
  [ ! -e new ] || fail "a failed run left new/: $(find new)"
  touch afile
  bad 1 "afile/o: cannot create output folder (Not a directory)" forward $IN --out afile/o
}

"class_$CLASS"
echo "bad inputs, $CLASS: ok"
