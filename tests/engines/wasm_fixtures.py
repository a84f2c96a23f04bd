"""Hand-written WASI preview 1 programs (WAT) for the Wasm engine tests.

Each program is compiled with ``wasmtime.wat2wasm`` at test time; nothing binary is
checked in. They share a tiny "libc" (``_PRELUDE``): argv/environ loading, a write loop
that handles short writes, and ``$open``, which resolves an absolute path against the
preopened directories the way wasi-libc does (longest matching preopen prefix, then
``path_open`` relative to it).

Memory map (page 0): 0–15 iovec scratch, 16–23 sizes, 24–31 prestat, 32–35 opened fd,
256–1023 string constants, 1024–2047 preopen name, 2048–3071 argv pointers,
3072–4095 environ pointers, 4096–8191 argv strings, 8192–12287 environ strings,
12288–12351 number formatting. Page 1 is the I/O buffer.
"""

from __future__ import annotations

import base64

import wasmtime

_IMPORTS = """
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get"
    (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_get"
    (func $fd_prestat_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_prestat_dir_name"
    (func $fd_prestat_dir_name (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
"""

_PRELUDE = """
  (memory (export "memory") 2)
  (data (i32.const 256) "cannot open ")
  (data (i32.const 272) "\\n")

  ;; write all of [ptr, ptr+len) to fd; returns the WASI errno (0 = ok)
  (func $write (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (local $err i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (local.set $err
          (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        (br_if $done (local.get $err))
        (local.set $ptr (i32.add (local.get $ptr) (i32.load (i32.const 8))))
        (local.set $len (i32.sub (local.get $len) (i32.load (i32.const 8))))
        (br $more)))
    (local.get $err))

  (func $strlen (param $p i32) (result i32)
    (local $n i32)
    (block $done
      (loop $l
        (br_if $done (i32.eqz (i32.load8_u (i32.add (local.get $p) (local.get $n)))))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $l)))
    (local.get $n))

  (func $puts (param $fd i32) (param $p i32)
    (drop (call $write (local.get $fd) (local.get $p) (call $strlen (local.get $p)))))

  (func $newline (param $fd i32)
    (drop (call $write (local.get $fd) (i32.const 272) (i32.const 1))))

  ;; argv: count at 16, pointers at 2048
  (func $load_args (result i32)
    (drop (call $args_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $args_get (i32.const 2048) (i32.const 4096)))
    (i32.load (i32.const 16)))

  (func $arg (param $i i32) (result i32)
    (i32.load (i32.add (i32.const 2048) (i32.shl (local.get $i) (i32.const 2)))))

  ;; environ: count returned, pointers at 3072
  (func $load_env (result i32)
    (drop (call $environ_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $environ_get (i32.const 3072) (i32.const 8192)))
    (i32.load (i32.const 16)))

  (func $env (param $i i32) (result i32)
    (i32.load (i32.add (i32.const 3072) (i32.shl (local.get $i) (i32.const 2)))))

  ;; decimal digits at p (stops at the first non-digit)
  (func $atoi (param $p i32) (result i32)
    (local $n i32) (local $c i32)
    (block $done
      (loop $l
        (local.set $c (i32.load8_u (local.get $p)))
        (br_if $done (i32.lt_u (local.get $c) (i32.const 48)))
        (br_if $done (i32.gt_u (local.get $c) (i32.const 57)))
        (local.set $n
          (i32.add (i32.mul (local.get $n) (i32.const 10)) (i32.sub (local.get $c) (i32.const 48))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $l)))
    (local.get $n))

  ;; the value of env var "NAME=" (pointer to the text after '='), or 0
  (func $getenv (param $name i32) (param $len i32) (result i32)
    (local $i i32) (local $count i32) (local $p i32)
    (local.set $count (call $load_env))
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
        (local.set $p (call $env (local.get $i)))
        (if (call $starts (local.get $p) (local.get $name) (local.get $len))
          (then (return (i32.add (local.get $p) (local.get $len)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (i32.const 0))

  (func $starts (param $s i32) (param $prefix i32) (param $len i32) (result i32)
    (local $i i32)
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $s) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $prefix) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (i32.const 1))

  ;; whether preopen name [a, a+alen) is a path prefix of [b, b+blen)
  (func $is_prefix (param $a i32) (param $alen i32) (param $b i32) (param $blen i32) (result i32)
    (if (i32.gt_u (local.get $alen) (local.get $blen)) (then (return (i32.const 0))))
    (if (i32.eqz (call $starts (local.get $b) (local.get $a) (local.get $alen)))
      (then (return (i32.const 0))))
    (if (i32.eq (local.get $alen) (local.get $blen)) (then (return (i32.const 1))))
    (if (i32.eq (i32.load8_u (i32.add (local.get $b) (local.get $alen))) (i32.const 47))
      (then (return (i32.const 1))))
    (if (i32.eqz (local.get $alen)) (then (return (i32.const 0))))
    (i32.eq (i32.load8_u (i32.add (local.get $a) (i32.sub (local.get $alen) (i32.const 1))))
            (i32.const 47)))

  ;; open an absolute path through the longest matching preopen: fd, or -errno
  (func $open (param $path i32) (param $len i32) (param $oflags i32) (param $rights i64)
              (result i32)
    (local $fd i32) (local $best i32) (local $bestlen i32) (local $nlen i32) (local $err i32)
    (local.set $fd (i32.const 3))
    (local.set $best (i32.const -1))
    (block $end
      (loop $scan
        (br_if $end (call $fd_prestat_get (local.get $fd) (i32.const 24)))
        (local.set $nlen (i32.load (i32.const 28)))
        (if (i32.le_u (local.get $nlen) (i32.const 1024))
          (then
            (drop (call $fd_prestat_dir_name (local.get $fd) (i32.const 1024) (local.get $nlen)))
            (if (call $is_prefix (i32.const 1024) (local.get $nlen)
                                 (local.get $path) (local.get $len))
              (then
                (if (i32.ge_u (local.get $nlen) (local.get $bestlen))
                  (then
                    (local.set $best (local.get $fd))
                    (local.set $bestlen (local.get $nlen))))))))
        (local.set $fd (i32.add (local.get $fd) (i32.const 1)))
        (br $scan)))
    (if (i32.lt_s (local.get $best) (i32.const 0)) (then (return (i32.const -76))))
    (local.set $path (i32.add (local.get $path) (local.get $bestlen)))
    (local.set $len (i32.sub (local.get $len) (local.get $bestlen)))
    (block $s
      (loop $sl
        (br_if $s (i32.eqz (local.get $len)))
        (br_if $s (i32.ne (i32.load8_u (local.get $path)) (i32.const 47)))
        (local.set $path (i32.add (local.get $path) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $sl)))
    (local.set $err
      (call $path_open (local.get $best) (i32.const 1) (local.get $path) (local.get $len)
        (local.get $oflags) (local.get $rights) (local.get $rights) (i32.const 0) (i32.const 32)))
    (if (local.get $err) (then (return (i32.sub (i32.const 0) (local.get $err)))))
    (i32.load (i32.const 32)))

  ;; open argv[i] for reading (rights FD_READ) or writing (CREAT|TRUNC, FD_WRITE);
  ;; on failure print "cannot open <path>" to stderr and exit 1
  (func $open_arg (param $i i32) (param $write i32) (result i32)
    (local $p i32) (local $fd i32)
    (local.set $p (call $arg (local.get $i)))
    (local.set $fd
      (if (result i32) (local.get $write)
        (then
          (call $open (local.get $p) (call $strlen (local.get $p)) (i32.const 9) (i64.const 64)))
        (else
          (call $open (local.get $p) (call $strlen (local.get $p)) (i32.const 0) (i64.const 2)))))
    (if (i32.lt_s (local.get $fd) (i32.const 0))
      (then
        (drop (call $write (i32.const 2) (i32.const 256) (i32.const 12)))
        (call $puts (i32.const 2) (local.get $p))
        (call $newline (i32.const 2))
        (call $proc_exit (i32.const 1))))
    (local.get $fd))

  ;; read a chunk of up to 64 KiB into page 1: bytes read (0 at EOF or on error)
  (func $read (param $fd i32) (result i32)
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.const 65536))
    (if (call $fd_read (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8))
      (then (return (i32.const 0))))
    (i32.load (i32.const 8)))

  ;; print an unsigned number and a newline
  (func $print_u32 (param $fd i32) (param $n i32)
    (local $p i32)
    (local.set $p (i32.const 12350))
    (loop $l
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $l (local.get $n)))
    (drop (call $write (local.get $fd) (local.get $p) (i32.sub (i32.const 12350) (local.get $p))))
    (call $newline (local.get $fd)))
"""


def _program(name: str, body: str, *, extra_imports: str = "") -> str:
    return f"(module ${name}\n{_IMPORTS}{extra_imports}{_PRELUDE}{body})\n"


# "Hello, world!\n" and return from _start without calling proc_exit (wasi-libc does the
# same for `return 0` from main): Bacalhau reports exit code -1 for that.
HELLO = _program(
    "hello",
    """
  (data (i32.const 512) "Hello, world!\\n")
  (func (export "_start")
    (drop (call $write (i32.const 1) (i32.const 512) (i32.const 14))))
""",
)

# cat argv[1] to stdout; exit 0, or 1 with "cannot open <path>" on stderr.
CAT = _program(
    "cat",
    """
  (func (export "_start")
    (local $fd i32) (local $n i32)
    (if (i32.lt_u (call $load_args) (i32.const 2)) (then (call $proc_exit (i32.const 2))))
    (local.set $fd (call $open_arg (i32.const 1) (i32.const 0)))
    (block $done
      (loop $l
        (local.set $n (call $read (local.get $fd)))
        (br_if $done (i32.eqz (local.get $n)))
        (drop (call $write (i32.const 1) (i32.const 65536) (local.get $n)))
        (br $l)))
    (call $proc_exit (i32.const 0)))
""",
)

# Exit with the number in $EXIT_CODE (0 when unset), through proc_exit.
EXIT_CODE = _program(
    "exit_code",
    """
  (data (i32.const 512) "EXIT_CODE=")
  (func (export "_start")
    (local $v i32)
    (local.set $v (call $getenv (i32.const 512) (i32.const 10)))
    (if (i32.eqz (local.get $v)) (then (call $proc_exit (i32.const 0))))
    (call $proc_exit (call $atoi (local.get $v))))
""",
)

# Print every environment variable as "K=V\n", in the order WASI hands them over.
ENV = _program(
    "env",
    """
  (func (export "_start")
    (local $i i32) (local $count i32)
    (local.set $count (call $load_env))
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
        (call $puts (i32.const 1) (call $env (local.get $i)))
        (call $newline (i32.const 1))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (call $proc_exit (i32.const 0)))
""",
)

# Print argv[0..] one per line.
ARGS = _program(
    "args",
    """
  (func (export "_start")
    (local $i i32) (local $count i32)
    (local.set $count (call $load_args))
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $count)))
        (call $puts (i32.const 1) (call $arg (local.get $i)))
        (call $newline (i32.const 1))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (call $proc_exit (i32.const 0)))
""",
)

# `cut -d, -f1 argv[1] > argv[2]`: the first column of a CSV file into a new file.
CSV_FIRST_COLUMN = _program(
    "csv",
    """
  (func (export "_start")
    (local $in i32) (local $out i32) (local $n i32) (local $i i32) (local $j i32)
    (local $c i32) (local $skip i32)
    (if (i32.lt_u (call $load_args) (i32.const 3)) (then (call $proc_exit (i32.const 2))))
    (local.set $in (call $open_arg (i32.const 1) (i32.const 0)))
    (local.set $out (call $open_arg (i32.const 2) (i32.const 1)))
    (block $eof
      (loop $chunk
        (local.set $n (call $read (local.get $in)))
        (br_if $eof (i32.eqz (local.get $n)))
        (local.set $i (i32.const 0))
        (local.set $j (i32.const 0))
        (block $done
          (loop $byte
            (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
            (local.set $c (i32.load8_u (i32.add (i32.const 65536) (local.get $i))))
            (if (i32.eq (local.get $c) (i32.const 10))
              (then (local.set $skip (i32.const 0))))
            (if (i32.eq (local.get $c) (i32.const 44))
              (then (local.set $skip (i32.const 1))))
            (if (i32.eqz (local.get $skip))
              (then
                (i32.store8 (i32.add (i32.const 65536) (local.get $j)) (local.get $c))
                (local.set $j (i32.add (local.get $j) (i32.const 1)))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $byte)))
        (if (call $write (local.get $out) (i32.const 65536) (local.get $j))
          (then (call $proc_exit (i32.const 3))))
        (br $chunk)))
    (call $proc_exit (i32.const 0)))
""",
)

# Spin forever (only the epoch deadline or a kill stops it).
LOOP = """
(module $loop
  (func (export "_start") (loop $l (br $l))))
"""

# Sleep 600 s in poll_oneoff: a host call, where epoch interruption cannot reach it.
SLEEP = _program(
    "sleep",
    """
  (func (export "_start")
    ;; one relative clock subscription at 512: tag 0 (clock), monotonic, 600 s
    (i32.store8 (i32.const 520) (i32.const 0))
    (i32.store (i32.const 528) (i32.const 1))
    (i64.store (i32.const 536) (i64.const 600000000000))
    (drop (call $poll_oneoff (i32.const 512) (i32.const 576) (i32.const 1) (i32.const 640)))
    (call $proc_exit (i32.const 0)))
""",
    extra_imports="""
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
""",
)

# Write $CHUNKS blocks of 64 KiB of 'x' to stdout, then "done" to stderr; exit 0.
FLOOD = _program(
    "flood",
    """
  (data (i32.const 512) "CHUNKS=")
  (data (i32.const 528) "done\\n")
  (func (export "_start")
    (local $left i32) (local $v i32)
    (local.set $v (call $getenv (i32.const 512) (i32.const 7)))
    (if (local.get $v) (then (local.set $left (call $atoi (local.get $v)))))
    (memory.fill (i32.const 65536) (i32.const 120) (i32.const 65536))
    (block $done
      (loop $l
        (br_if $done (i32.eqz (local.get $left)))
        (if (call $write (i32.const 1) (i32.const 65536) (i32.const 65536))
          (then (call $proc_exit (i32.const 4))))
        (local.set $left (i32.sub (local.get $left) (i32.const 1)))
        (br $l)))
    (drop (call $write (i32.const 2) (i32.const 528) (i32.const 5)))
    (call $proc_exit (i32.const 0)))
""",
)

# Grow memory by $PAGES pages: "grew\\n" and exit 0, or "grow failed\\n" and exit 3.
GROW = _program(
    "grow",
    """
  (data (i32.const 512) "PAGES=")
  (data (i32.const 528) "grew\\n")
  (data (i32.const 544) "grow failed\\n")
  (func (export "_start")
    (local $v i32)
    (local.set $v (call $getenv (i32.const 512) (i32.const 6)))
    (if (i32.eq (memory.grow (call $atoi (local.get $v))) (i32.const -1))
      (then
        (drop (call $write (i32.const 2) (i32.const 544) (i32.const 12)))
        (call $proc_exit (i32.const 3))))
    (drop (call $write (i32.const 1) (i32.const 528) (i32.const 5)))
    (call $proc_exit (i32.const 0)))
""",
)

# Needs 200 pages (12.5 MiB) of memory just to be instantiated.
BIG_MEMORY = """
(module $big
  (memory 200)
  (func (export "_start")))
"""

# Traps with `unreachable` after printing to stdout.
TRAP = _program(
    "trap",
    """
  (data (i32.const 512) "about to trap\\n")
  (func (export "_start")
    (drop (call $write (i32.const 1) (i32.const 512) (i32.const 14)))
    unreachable)
""",
)

# A library module, linked by its name "mathlib", and a program that uses it.
MATHLIB = """
(module $mathlib
  (func (export "add") (param i32 i32) (result i32)
    (i32.add (local.get 0) (local.get 1))))
"""

EASTER = _program(
    "easter",
    """
  (func (export "_start")
    (call $print_u32 (i32.const 1) (call $add (i32.const 10) (i32.const 7)))
    (call $proc_exit (i32.const 0)))
""",
    extra_imports="""
  (import "mathlib" "add" (func $add (param i32 i32) (result i32)))
""",
)

# Imports a function nobody provides.
MISSING_IMPORT = """
(module $needy
  (import "env" "missing" (func $missing))
  (func (export "_start") (call $missing)))
"""


def wasm(source: str) -> bytes:
    """The binary module of a WAT source."""
    return bytes(wasmtime.wat2wasm(source))


def data_url(source: str) -> str:
    """An RFC 2397 data URL carrying the compiled module (for ``StorageSource: Inline``)."""
    return "data:application/wasm;base64," + base64.b64encode(wasm(source)).decode()
