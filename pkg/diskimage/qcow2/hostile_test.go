package qcow2

import (
	"bytes"
	"cmp"
	"compress/flate"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"github.com/klauspost/compress/zstd"

	"vimg.dev/vimg/pkg/diskimage/codec"
	"vimg.dev/vimg/pkg/diskimage/stream"
	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// The hostile corpus: every case starts from an image qemu-img made and
// patches it at the offsets the qcow2 specification documents. Each case runs
// through both readers (Open on an *os.File and on a bytes.Reader, reading
// every byte and walking every extent; NewDecoder on a plain io.Reader,
// decoding every chunk) and must fail with a specific message, the right
// sentinel, no panic and bounded memory. Controls (is == nil) must instead
// succeed and match `qemu-img convert -O raw`, so that a reader that refuses
// everything cannot pass.

// Header field offsets (qcow2 specification, "Header").
const (
	offMagic          = 0
	offVersion        = 4
	offBackingOffset  = 8
	offBackingSize    = 16
	offClusterBits    = 20
	offSize           = 24
	offCryptMethod    = 32
	offL1Size         = 36
	offL1Offset       = 40
	offRefcountOffset = 48
	offRefcountClust  = 56
	offIncompatible   = 72
	offRefcountOrder  = 96
	offHeaderLength   = 100
	offCompression    = 104
)

// hostileBudget is the most a case may allocate on one path.
const hostileBudget = 64 << 20

// oflagCopied is bit 63 of L1 and L2 entries (refcount is exactly one).
const oflagCopied = 1 << 63

// qfile is a qcow2 file in memory, parsed independently of the code under
// test so that a bug there cannot hide in the test's own reading.
type qfile struct {
	t *testing.T
	b []byte
}

func (q *qfile) u32(off int64) uint32      { return binary.BigEndian.Uint32(q.b[off:]) }
func (q *qfile) u64(off int64) uint64      { return binary.BigEndian.Uint64(q.b[off:]) }
func (q *qfile) put32(off int64, v uint32) { binary.BigEndian.PutUint32(q.b[off:], v) }
func (q *qfile) put64(off int64, v uint64) { binary.BigEndian.PutUint64(q.b[off:], v) }
func (q *qfile) clusterBits() uint         { return uint(q.u32(offClusterBits)) }
func (q *qfile) clusterSize() int64        { return 1 << q.clusterBits() }
func (q *qfile) l1Offset() int64           { return int64(q.u64(offL1Offset)) }
func (q *qfile) l1Size() int64             { return int64(q.u32(offL1Size)) }
func (q *qfile) extL2() bool {
	return q.u32(offVersion) >= 3 && q.u64(offIncompatible)&incompatExtendedL2 != 0
}

func (q *qfile) entrySize() int64 {
	if q.extL2() {
		return 16
	}
	return 8
}

// alignEnd pads the file with zeros to a multiple of n and returns its size.
func (q *qfile) alignEnd(n int64) int64 {
	for int64(len(q.b))%n != 0 {
		q.b = append(q.b, 0)
	}
	return int64(len(q.b))
}

// appendAligned appends data at the next multiple of n and returns its offset.
func (q *qfile) appendAligned(n int64, data []byte) int64 {
	off := q.alignEnd(n)
	q.b = append(q.b, data...)
	return off
}

// ref is one L2 entry that maps something.
type ref struct {
	l1Index int64
	at      int64  // file offset of the entry
	entry   uint64 // its first word
	guest   int64
}

func (r ref) compressed() bool { return r.entry&l2Compressed != 0 }

// refs lists every L2 entry that is not all zero, in guest order.
func (q *qfile) refs() []ref {
	cs, es := q.clusterSize(), q.entrySize()
	per := cs / es
	var out []ref
	for i := int64(0); i < q.l1Size(); i++ {
		l2 := int64(q.u64(q.l1Offset()+8*i) & l1OffsetMask)
		if l2 == 0 {
			continue
		}
		for j := int64(0); j < per; j++ {
			at := l2 + j*es
			e := q.u64(at)
			if e == 0 && (es == 8 || q.u64(at+8) == 0) {
				continue
			}
			out = append(out, ref{l1Index: i, at: at, entry: e, guest: (i*per + j) * cs})
		}
	}
	return out
}

// find returns the first entry ok accepts.
func (q *qfile) find(what string, ok func(ref) bool) ref {
	for _, r := range q.refs() {
		if ok(r) {
			return r
		}
	}
	q.t.Fatalf("test image has no %s", what)
	return ref{}
}

func (q *qfile) firstData() ref {
	return q.find("uncompressed data cluster", func(r ref) bool {
		return !r.compressed() && r.entry&l2OffsetMask != 0
	})
}

// compressedLoc splits a compressed L2 entry into host offset and the bytes
// it spans up to the end of its last sector.
func (q *qfile) compressedLoc(e uint64) (host, n int64) {
	x := q.clusterBits() - 8
	desc := e &^ (3 << 62)
	host = int64(desc & (1<<(62-x) - 1))
	sectors := int64(desc>>(62-x)&(1<<x-1)) + 1
	return host, sectors*512 - host%512
}

// compressedEntry builds a compressed L2 entry for n bytes at host.
func (q *qfile) compressedEntry(host, n int64) uint64 {
	x := q.clusterBits() - 8
	sectors := (host%512 + n + 511) / 512
	if sectors > 1<<x {
		q.t.Fatalf("%d compressed bytes do not fit an L2 entry", n)
	}
	return l2Compressed | uint64(sectors-1)<<(62-x) | uint64(host)
}

// largestCompressed is the compressed cluster with the most room.
func (q *qfile) largestCompressed() ref {
	var best ref
	var bestN int64
	for _, r := range q.refs() {
		if !r.compressed() {
			continue
		}
		if _, n := q.compressedLoc(r.entry); n > bestN {
			best, bestN = r, n
		}
	}
	if bestN == 0 {
		q.t.Fatal("test image has no compressed cluster")
	}
	return best
}

// corpus makes the base images once, on first use.
type corpus struct {
	dir  string
	mu   sync.Mutex
	made map[string]string
}

const corpusDiskSize = 4 << 20

// baseArgs are the qemu-img convert options of each base image.
var baseArgs = map[string][]string{
	"plain": nil,
	"zlib":  {"-c"},
	"zstd":  {"-c", "-o", "compression_type=zstd"},
	"v2":    {"-o", "compat=0.10"},
	"extl2": {"-o", "extended_l2=on,cluster_size=128k"},
	"4k":    {"-o", "cluster_size=4096"},
}

func (c *corpus) path(t *testing.T, name string) string {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if p, ok := c.made[name]; ok {
		return p
	}
	raw := filepath.Join(c.dir, "pattern.raw")
	if _, err := os.Stat(raw); err != nil {
		testimg.Pattern(t, raw, corpusDiskSize, 7)
	}
	args, ok := baseArgs[name]
	if !ok {
		t.Fatalf("no base image %q", name)
	}
	p := filepath.Join(c.dir, name+".qcow2")
	testimg.QemuImg(t, append(append([]string{"convert", "-O", "qcow2"}, args...), raw, p)...)
	c.made[name] = p
	return p
}

func (c *corpus) load(t *testing.T, name string) *qfile {
	b, err := os.ReadFile(c.path(t, name))
	if err != nil {
		t.Fatal(err)
	}
	return &qfile{t: t, b: b}
}

// write stores b in a fresh file of the subtest.
func writeImage(t *testing.T, b []byte) string {
	p := filepath.Join(t.TempDir(), "case.qcow2")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// hostile is one case of the corpus.
type hostile struct {
	name  string
	build func(t *testing.T) string
	// want is a substring of the error Open (or reading the opened image)
	// returns; streamWant that of NewDecoder+Run, when it differs. An
	// empty one means that path must succeed.
	want, streamWant string
	// is is stream.ErrCorrupt or stream.ErrUnsupported; nil marks a control:
	// both paths must convert like qemu-img.
	is   error
	opts StreamOptions
	// unchecked computes, from the case's file, what a reader trusting it
	// would allocate: the cases that guard big allocations must be shown to
	// ask for gigabytes. budget, if set, replaces hostileBudget.
	unchecked func(q *qfile) uint64
	budget    uint64
}

func TestHostile(t *testing.T) {
	testimg.Require(t, "qemu-img")
	c := &corpus{dir: t.TempDir(), made: map[string]string{}}

	// patch returns a build that applies edit to a copy of a base image.
	patch := func(base string, edit func(q *qfile)) func(t *testing.T) string {
		return func(t *testing.T) string {
			q := c.load(t, base)
			edit(q)
			return writeImage(t, q.b)
		}
	}
	unpatched := func(base string) func(t *testing.T) string {
		return func(t *testing.T) string { return c.path(t, base) }
	}
	qemuCreate := func(args ...string) func(t *testing.T) string {
		return func(t *testing.T) string {
			dir := t.TempDir()
			for i, a := range args {
				args[i] = strings.ReplaceAll(a, "$DIR", dir)
			}
			testimg.QemuImg(t, args...)
			return filepath.Join(dir, "top.qcow2")
		}
	}
	truncated := func(base string, frac float64, at int64) func(t *testing.T) string {
		return patch(base, func(q *qfile) {
			n := at
			if n == 0 {
				n = int64(float64(len(q.b)) * frac)
			}
			q.b = q.b[:n]
		})
	}

	var cases []hostile
	add := func(h ...hostile) { cases = append(cases, h...) }
	corrupt, unsupported := stream.ErrCorrupt, stream.ErrUnsupported

	// Controls, one per base image, plus the shapes the hostile cases need.
	for _, base := range []string{"plain", "zlib", "zstd", "v2", "extl2", "4k"} {
		add(hostile{name: "control/" + base, build: unpatched(base)})
	}
	add(
		hostile{name: "control/empty-disk", build: qemuCreate("create", "-f", "qcow2", "$DIR/top.qcow2", "0")},
		hostile{name: "control/dirty-bit", build: patch("plain", func(q *qfile) { q.put64(offIncompatible, incompatDirty) })},
		hostile{name: "control/no-header-extensions-v2", build: patch("v2", func(q *qfile) {
			clear(q.b[72:q.clusterSize()])
		})},
	)

	// 1-4: backing files. The library would open them (relative to the
	// image's directory, or any absolute path, or a directory when the name
	// is empty); the header check refuses before it runs.
	add(
		hostile{name: "backing/relative", want: `backing file "base.qcow2"`, is: unsupported, build: func(t *testing.T) string {
			dir := t.TempDir()
			testimg.QemuImg(t, "create", "-f", "qcow2", filepath.Join(dir, "base.qcow2"), "1M")
			top := filepath.Join(dir, "top.qcow2")
			testimg.QemuImg(t, "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
			return top
		}},
		hostile{name: "backing/absolute", want: `backing file "/`, is: unsupported, build: func(t *testing.T) string {
			dir := t.TempDir()
			base := filepath.Join(dir, "base.qcow2")
			testimg.QemuImg(t, "create", "-f", "qcow2", base, "1M")
			top := filepath.Join(dir, "top.qcow2")
			testimg.QemuImg(t, "create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
			return top
		}},
		hostile{name: "backing/json-etc-passwd", want: `backing file "json:{`, is: unsupported,
			build: qemuCreate("create", "-f", "qcow2", "-u", "-b", `json:{"file.driver":"file","file.filename":"/etc/passwd"}`, "-F", "raw", "$DIR/top.qcow2", "1M")},
		hostile{name: "backing/offset-without-size", want: `backing file ""`, is: unsupported,
			build: patch("plain", func(q *qfile) { q.put64(offBackingOffset, 0x200); q.put32(offBackingSize, 0) })},
		hostile{name: "backing/offset-wraps-around", want: `backing file "?"`, is: unsupported,
			build: patch("plain", func(q *qfile) { q.put64(offBackingOffset, ^uint64(0)-0xf); q.put32(offBackingSize, 0x20) })},
		hostile{name: "backing/name-too-long", want: `backing file "?"`, is: unsupported,
			build: patch("plain", func(q *qfile) { q.put64(offBackingOffset, 0x200); q.put32(offBackingSize, 0xffffffff) })},
	)

	// 5-6: external data files.
	dataFile := func(t *testing.T) *qfile {
		dir := t.TempDir()
		p := filepath.Join(dir, "top.qcow2")
		testimg.QemuImg(t, "create", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "x.raw"), p, "1M")
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return &qfile{t: t, b: b}
	}
	add(
		hostile{name: "data-file/incompatible-bit", want: "keeps its data in an external data file", is: unsupported,
			build: func(t *testing.T) string { return writeImage(t, dataFile(t).b) }},
		hostile{name: "data-file/extension-only", want: "names an external data file", is: unsupported,
			build: func(t *testing.T) string {
				q := dataFile(t)
				q.put64(offIncompatible, q.u64(offIncompatible)&^incompatDataFile)
				return writeImage(t, q.b)
			}},
	)

	// 7: encryption.
	luks := func(t *testing.T) *qfile {
		p := filepath.Join(t.TempDir(), "top.qcow2")
		// qemu-img times its PBKDF by thread CPU time and gives up with
		// "Unable to get accurate CPU usage" when a round measures 0 ms,
		// which happens now and then on a busy VM: try again then.
		args := []string{"create", "-f", "qcow2", "--object", "secret,id=s0,data=abc",
			"-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", p, "1M"}
		for attempt := 1; ; attempt++ {
			out, err := exec.Command(testimg.Require(t, "qemu-img"), args...).CombinedOutput()
			if err == nil {
				break
			}
			if attempt == 5 || !strings.Contains(string(out), "Unable to get accurate CPU usage") {
				t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
			}
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return &qfile{t: t, b: b}
	}
	add(
		hostile{name: "encryption/luks", want: "encrypted (crypt_method 2)", is: unsupported,
			build: func(t *testing.T) string { return writeImage(t, luks(t).b) }},
		hostile{name: "encryption/luks-header-without-method", want: "carries an encryption header", is: unsupported,
			build: func(t *testing.T) string {
				q := luks(t)
				q.put32(offCryptMethod, 0)
				return writeImage(t, q.b)
			}},
		hostile{name: "encryption/aes", want: "encrypted (crypt_method 1)", is: unsupported,
			build: patch("plain", func(q *qfile) { q.put32(offCryptMethod, 1) })},
		hostile{name: "encryption/unknown-method", want: "encrypted (crypt_method 7)", is: unsupported,
			build: patch("plain", func(q *qfile) { q.put32(offCryptMethod, 7) })},
	)

	// 8: the L1 table.
	add(
		hostile{name: "l1/huge-size", want: "L1 table of 4294967295 entries exceeds", is: corrupt,
			unchecked: func(q *qfile) uint64 { return uint64(q.l1Size()) * 8 },
			build:     patch("plain", func(q *qfile) { q.put32(offL1Size, 0xffffffff) })},
		hostile{name: "l1/just-over-limit", want: "L1 table of 4194305 entries exceeds", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put32(offL1Size, maxL1Bytes/8+1) })},
		hostile{name: "l1/smaller-than-disk", want: "L1 table has 0 entries, the 4194304 byte disk needs 1", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put32(offL1Size, 0) })},
		hostile{name: "l1/past-eof", want: "L1 table at 268435456 (1 entries) lies beyond the end of the file",
			streamWant: "truncated", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put64(offL1Offset, 0x10000000) })},
		// The stream cannot see the end of the file up front: the 32 MiB
		// table must not be allocated before its bytes arrive.
		hostile{name: "l1/max-size-past-eof", want: "L1 table at 196608 (4194304 entries) lies beyond the end of the file",
			streamWant: "truncated", is: corrupt, budget: 16 << 20,
			build: patch("plain", func(q *qfile) { q.put32(offL1Size, maxL1Bytes/8) })},
		hostile{name: "l1/unaligned", want: "L1 table offset 196616 is not cluster aligned", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put64(offL1Offset, q.u64(offL1Offset)+8) })},
		hostile{name: "l1/top-bit-set", want: "L1 table offset 0x8000000000030000 is out of range", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put64(offL1Offset, 1<<63|q.u64(offL1Offset)) })},
		hostile{name: "l1/offset-overflows", want: "L1 table offset 0x7fffffffffff0000 is out of range", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put64(offL1Offset, 0x7fffffffffff0000) })},
		hostile{name: "l1/offset-zero", want: "L1 table offset 0 is not cluster aligned", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put64(offL1Offset, 0) })},
	)

	// 9: cluster_bits.
	for _, bits := range []uint32{0, 8, 22, 30, 63} {
		h := hostile{name: fmt.Sprintf("cluster-bits/%d", bits), want: fmt.Sprintf("cluster_bits %d out of range 9..21", bits), is: corrupt,
			build: patch("plain", func(q *qfile) { q.put32(offClusterBits, bits) })}
		if bits >= 30 {
			// One cluster: the header read, each L2 table.
			h.unchecked = func(q *qfile) uint64 { return 1 << q.clusterBits() }
		}
		add(h)
	}

	// 10: the virtual size. l1_size is raised to match, so that only the
	// size check can trip.
	bigSize := func(size uint64) func(q *qfile) {
		return func(q *qfile) {
			q.put64(offSize, size)
			per := uint64(q.clusterSize()) * uint64(q.clusterSize()/8)
			q.put32(offL1Size, uint32(min((size+per-1)/per, 0xffffffff)))
		}
	}
	add(
		hostile{name: "size/1-EiB", want: "virtual size 1152921504606846976 exceeds the 70368744177664 byte limit", is: corrupt,
			// The L1 table the size needs: 16 GiB.
			unchecked: func(q *qfile) uint64 {
				return q.u64(offSize) / uint64(q.clusterSize()*q.clusterSize()/8) * 8
			},
			build: patch("plain", bigSize(1<<60))},
		hostile{name: "size/64-TiB-plus-one-sector", want: "virtual size 70368744178176 exceeds", is: corrupt,
			build: patch("plain", bigSize(MaxVirtualSize+512))},
		hostile{name: "size/max-uint64", want: "virtual size 18446744073709551615 exceeds", is: corrupt,
			build: patch("plain", bigSize(^uint64(0)))},
	)

	// The refcount table.
	add(
		hostile{name: "refcount/huge-table", want: "refcount table of 281474976645120 bytes exceeds", is: corrupt,
			unchecked: func(q *qfile) uint64 { return uint64(q.u32(offRefcountClust)) << q.clusterBits() },
			build:     patch("plain", func(q *qfile) { q.put32(offRefcountClust, 0xffffffff) })},
		hostile{name: "refcount/past-eof", want: "refcount table at 268435456 (65536 bytes) lies beyond the end of the file",
			streamWant: "truncated", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put64(offRefcountOffset, 0x10000000) })},
		hostile{name: "refcount/unaligned", want: "refcount table offset 66048 is not cluster aligned", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put64(offRefcountOffset, 0x10200) })},
		hostile{name: "refcount/offset-overflows", want: "refcount table offset 0x7fffffffffff0000 is out of range", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put64(offRefcountOffset, 0x7fffffffffff0000) })},
	)

	// 11: L2 tables (L1 entries).
	setL1 := func(base string, idx int64, entry func(q *qfile) uint64) func(t *testing.T) string {
		return patch(base, func(q *qfile) { q.put64(q.l1Offset()+8*idx, entry(q)) })
	}
	add(
		hostile{name: "l2/past-eof", want: "L2 table 0 at offset 268435456 lies beyond the end of the file",
			streamWant: "truncated", is: corrupt,
			build: setL1("plain", 0, func(q *qfile) uint64 { return oflagCopied | 0x10000000 })},
		hostile{name: "l2/past-eof-top-bits", want: "L2 table 0 at offset 72057594037862400 lies beyond the end of the file",
			streamWant: "truncated", is: corrupt,
			build: setL1("plain", 0, func(q *qfile) uint64 { return oflagCopied | 0x00ffffffffff0000 })},
		hostile{name: "l2/unaligned", want: "L2 table 0 at offset 262656 is not cluster aligned", is: corrupt,
			build: setL1("plain", 0, func(q *qfile) uint64 { return q.u64(q.l1Offset()) + 512 })},
		hostile{name: "l2/at-header", want: "L2 table 0 at offset 512 is not cluster aligned", is: corrupt,
			build: setL1("plain", 0, func(q *qfile) uint64 { return 512 })},
		hostile{name: "l2/at-l1-table", want: "L2 table 0 at offset 196608 overlaps other metadata", is: corrupt,
			build: setL1("plain", 0, func(q *qfile) uint64 { return oflagCopied | uint64(q.l1Offset()) })},
		hostile{name: "l2/at-refcount-table", want: "L2 table 0 at offset 65536 overlaps other metadata", is: corrupt,
			build: setL1("plain", 0, func(q *qfile) uint64 { return oflagCopied | q.u64(offRefcountOffset) })},
		hostile{name: "l2/shared-by-two-l1-entries", want: "L2 table 1 at offset 16384 is also L2 table 0", is: corrupt,
			build: setL1("4k", 1, func(q *qfile) uint64 { return q.u64(q.l1Offset()) })},
		// One L2 table named by all 2048 L1 entries of a 1 TiB disk, all
		// its entries naming one cluster at the end of the file: a reader
		// that queues every mapping before reading the data holds 16 M of
		// them, from a 320 KiB file.
		hostile{name: "l2/shared-amplification", want: "L2 table 1 at offset 262144 is also L2 table 0", is: corrupt,
			// Every mapping queued by the one-pass decoder.
			unchecked: func(q *qfile) uint64 {
				return uint64(q.l1Size()) * uint64(q.clusterSize()/8) * uint64(unsafe.Sizeof(target{}))
			},
			build: func(t *testing.T) string {
				p := filepath.Join(t.TempDir(), "big.qcow2")
				testimg.QemuImg(t, "create", "-f", "qcow2", p, "1T")
				b, err := os.ReadFile(p)
				if err != nil {
					t.Fatal(err)
				}
				q := &qfile{t: t, b: b}
				cs := q.clusterSize()
				l2 := q.appendAligned(cs, make([]byte, cs))
				data := q.appendAligned(cs, bytes.Repeat([]byte("data"), int(cs/4)))
				for j := int64(0); j < cs/8; j++ {
					q.put64(l2+8*j, oflagCopied|uint64(data))
				}
				for i := int64(0); i < q.l1Size(); i++ {
					q.put64(q.l1Offset()+8*i, oflagCopied|uint64(l2))
				}
				return writeImage(t, q.b)
			}},
	)

	// 12: data clusters (L2 entries).
	setData := func(base string, pick func(q *qfile) ref, entry func(q *qfile, r ref) uint64) func(t *testing.T) string {
		return patch(base, func(q *qfile) {
			r := pick(q)
			q.put64(r.at, entry(q, r))
		})
	}
	first := (*qfile).firstData
	add(
		hostile{name: "data/past-eof", want: "at host offset 268435456 lies beyond the end of the file",
			streamWant: "truncated", is: corrupt,
			build: setData("plain", first, func(q *qfile, r ref) uint64 { return oflagCopied | 0x10000000 })},
		hostile{name: "data/straddles-eof", want: "lies beyond the end of the file", streamWant: "truncated", is: corrupt,
			build: patch("plain", func(q *qfile) {
				q.alignEnd(q.clusterSize())
				q.put64(q.firstData().at, oflagCopied|uint64(len(q.b)))
				q.b = append(q.b, make([]byte, q.clusterSize()/2)...)
			})},
		hostile{name: "data/unaligned", want: "data cluster at host offset 328192 is not cluster aligned", is: corrupt,
			build: setData("plain", first, func(q *qfile, r ref) uint64 { return r.entry + 512 })},
		hostile{name: "data/in-l1-table", want: "at host offset 196608 points into metadata", is: corrupt,
			build: setData("plain", first, func(q *qfile, r ref) uint64 { return oflagCopied | uint64(q.l1Offset()) })},
		hostile{name: "data/in-l2-table", want: "at host offset 262144 points into metadata", is: corrupt,
			build: setData("plain", first, func(q *qfile, r ref) uint64 { return oflagCopied | uint64(r.at&^(q.clusterSize()-1)) })},
		hostile{name: "data/in-refcount-table", want: "at host offset 65536 points into metadata", is: corrupt,
			build: setData("plain", first, func(q *qfile, r ref) uint64 { return oflagCopied | q.u64(offRefcountOffset) })},
		// qemu ignores reserved bits and reads zeros; go-qcow2reader takes
		// the entry for an allocated cluster at offset 0 and fails.
		hostile{name: "data/reserved-bits-without-offset", want: "L2 entry 0x10 sets reserved bits but no host offset", is: corrupt,
			build: setData("plain", first, func(q *qfile, r ref) uint64 { return 0x10 })},
		hostile{name: "data/reserved-high-bit-without-offset", want: "L2 entry 0x200000000000000 sets reserved bits but no host offset", is: corrupt,
			build: setData("plain", first, func(q *qfile, r ref) uint64 { return 1 << 57 })},
		hostile{name: "control/data-reserved-bits-with-offset", build: setData("plain", first, func(q *qfile, r ref) uint64 {
			return r.entry | 0x10 | 1<<57 // qemu and the library both mask them off
		})},
		hostile{name: "data/zero-flag-in-v2", want: "zero flag, which version 2 images do not have", is: corrupt,
			build: setData("v2", first, func(q *qfile, r ref) uint64 { return r.entry | l2ZeroFlag })},
		hostile{name: "compressed/in-header", want: "at host offset 100 points into metadata at 0..", is: corrupt,
			build: setData("zlib", (*qfile).largestCompressed, func(q *qfile, r ref) uint64 { return q.compressedEntry(100, 512) })},
		hostile{name: "compressed/in-l2-table", want: "points into metadata at", is: corrupt,
			build: setData("zlib", (*qfile).largestCompressed, func(q *qfile, r ref) uint64 {
				return q.compressedEntry(r.at&^(q.clusterSize()-1)+1000, 512)
			})},
		hostile{name: "compressed/past-eof", want: "at host offset 268435456 (+512) lies beyond the end of the file",
			streamWant: "truncated", is: corrupt,
			build: setData("zlib", (*qfile).largestCompressed, func(q *qfile, r ref) uint64 { return q.compressedEntry(0x10000000, 512) })},
		hostile{name: "compressed/host-zero", want: "compressed cluster at host offset 0", is: corrupt,
			build: setData("zlib", (*qfile).largestCompressed, func(q *qfile, r ref) uint64 { return l2Compressed })},
	)

	// 13-14: compressed clusters whose payload lies.
	zeros := func(q *qfile) []byte { return make([]byte, 4*q.clusterSize()) }
	deflateBomb := func(q *qfile) []byte {
		var buf bytes.Buffer
		w, err := flate.NewWriter(&buf, flate.BestCompression)
		if err != nil {
			q.t.Fatal(err)
		}
		w.Write(zeros(q))
		w.Close()
		return buf.Bytes()
	}
	zstdBomb := func(q *qfile) []byte {
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBestCompression))
		if err != nil {
			q.t.Fatal(err)
		}
		return enc.EncodeAll(zeros(q), nil)
	}
	// A streamed frame does not declare its size: the decoder only finds
	// out while decoding.
	zstdBombNoSize := func(q *qfile) []byte {
		var buf bytes.Buffer
		enc, err := zstd.NewWriter(&buf)
		if err != nil {
			q.t.Fatal(err)
		}
		enc.Write(zeros(q))
		enc.Close()
		var h zstd.Header
		if err := h.Decode(buf.Bytes()); err != nil || h.HasFCS {
			q.t.Fatalf("zstd frame should not declare its size: %+v %v", h, err)
		}
		return buf.Bytes()
	}
	garbage := func(q *qfile) []byte { return bytes.Repeat([]byte{0xff}, 64) }
	// inPlace overwrites the largest compressed cluster's own sectors.
	inPlace := func(base string, payload func(q *qfile) []byte) func(t *testing.T) string {
		return patch(base, func(q *qfile) {
			r := q.largestCompressed()
			host, n := q.compressedLoc(r.entry)
			p := payload(q)
			// The last sector may be shared with the next cluster.
			if int64(len(p)) > n-512 {
				q.t.Fatalf("payload of %d bytes does not fit in %d", len(p), n-512)
			}
			copy(q.b[host:], p)
		})
	}
	// appended points the first compressed cluster at payload appended to
	// the file.
	appended := func(base string, payload func(q *qfile) []byte) func(t *testing.T) string {
		return patch(base, func(q *qfile) {
			r := q.find("compressed cluster", ref.compressed)
			p := payload(q)
			host := q.appendAligned(512, p)
			q.alignEnd(512)
			q.put64(r.at, q.compressedEntry(host, int64(len(p))))
		})
	}
	add(
		hostile{name: "compressed/zlib-bomb-in-place", want: "inflates past", is: corrupt, build: inPlace("zlib", deflateBomb)},
		hostile{name: "compressed/zlib-bomb-appended", want: "inflates past", is: corrupt, build: appended("zlib", deflateBomb)},
		hostile{name: "compressed/zstd-bomb-in-place", want: "inflates past", is: corrupt, build: inPlace("zstd", zstdBomb)},
		hostile{name: "compressed/zstd-bomb-appended", want: "inflates past", is: corrupt, build: appended("zstd", zstdBomb)},
		hostile{name: "compressed/zstd-bomb-without-size", want: "inflates past", is: corrupt, build: appended("zstd", zstdBombNoSize)},
		// The descriptor claims one sector; the real compressed data is
		// longer. qemu reads exactly the sectors the descriptor names (and
		// fails); so must both readers.
		hostile{name: "compressed/zlib-descriptor-too-short", want: "deflate: ", is: corrupt, build: shortDescriptor(c, "zlib")},
		hostile{name: "compressed/zstd-descriptor-too-short", want: "zstd: frame is truncated", is: corrupt, build: shortDescriptor(c, "zstd")},
		hostile{name: "compressed/zlib-garbage", want: "deflate: ", is: corrupt, build: inPlace("zlib", garbage)},
		hostile{name: "compressed/zstd-garbage", want: "payload does not start with a zstd frame", is: corrupt, build: inPlace("zstd", garbage)},
		hostile{name: "compressed/zstd-cut-frame", want: "corrupt image: zstd: ", is: corrupt,
			build: appended("zstd", func(q *qfile) []byte {
				enc, err := zstd.NewWriter(nil)
				if err != nil {
					q.t.Fatal(err)
				}
				frame := enc.EncodeAll(bytes.Repeat([]byte("vimg"), int(q.clusterSize()/4)), nil)
				return frame[:len(frame)/2]
			})},
	)

	// 15: truncated files. Open sees the end of the file up front; the
	// stream runs into it.
	for _, base := range []string{"plain", "zlib"} {
		add(
			hostile{name: "truncated/" + base + "-50%", want: "lies beyond the end of the file", streamWant: "file is truncated", is: corrupt,
				build: truncated(base, 0.5, 0)},
			hostile{name: "truncated/" + base + "-90%", want: "lies beyond the end of the file", streamWant: "file is truncated", is: corrupt,
				build: truncated(base, 0.9, 0)},
			hostile{name: "truncated/" + base + "-after-header", want: "lies beyond the end of the file", streamWant: "file is truncated", is: corrupt,
				build: truncated(base, 0, 112)},
			hostile{name: "truncated/" + base + "-after-header-cluster", want: "lies beyond the end of the file", streamWant: "file is truncated", is: corrupt,
				build: truncated(base, 0, 64<<10)},
		)
	}
	add(
		hostile{name: "truncated/mid-header", want: "version 3 header is truncated", is: corrupt, build: truncated("plain", 0, 90)},
		hostile{name: "truncated/empty-file", want: "no magic", is: corrupt, build: truncated("plain", 0, 1)},
		hostile{name: "header/no-magic", want: "no magic", is: corrupt,
			build: patch("plain", func(q *qfile) { copy(q.b[offMagic:], "QFI\xfc") })},
	)

	// 16: header fields.
	add(
		hostile{name: "header/unknown-incompatible-bit-5", want: "unknown incompatible feature bits 0x20", is: unsupported,
			build: patch("plain", func(q *qfile) { q.put64(offIncompatible, 1<<5) })},
		hostile{name: "header/unknown-incompatible-bit-63", want: "unknown incompatible feature bits 0x8000000000000000", is: unsupported,
			build: patch("plain", func(q *qfile) { q.put64(offIncompatible, 1<<63) })},
		hostile{name: "header/corrupt-bit", want: "marked corrupt by qemu", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put64(offIncompatible, incompatCorrupt) })},
		hostile{name: "header/version-1", want: "version 1 (only 2 and 3 exist)", is: unsupported,
			build: patch("plain", func(q *qfile) { q.put32(offVersion, 1) })},
		hostile{name: "header/version-4", want: "version 4 (only 2 and 3 exist)", is: unsupported,
			build: patch("plain", func(q *qfile) { q.put32(offVersion, 4) })},
		hostile{name: "header/refcount-order-7", want: "refcount_order 7 out of range", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put32(offRefcountOrder, 7) })},
		hostile{name: "header/length-20", want: "header length 20 out of range", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put32(offHeaderLength, 20) })},
		hostile{name: "header/length-100000", want: "header length 100000 out of range", is: corrupt,
			build: patch("plain", func(q *qfile) { q.put32(offHeaderLength, 100000) })},
		hostile{name: "header/extension-too-long", want: "header extension 0x6803f857 of 4294967295 bytes runs past the header cluster", is: corrupt,
			build: patch("plain", func(q *qfile) {
				// The first extension of a qemu image is the feature table.
				q.put32(int64(q.u32(offHeaderLength))+4, 0xffffffff)
			})},
		hostile{name: "header/extended-l2-small-clusters", want: "extended L2 entries need clusters of at least 16 KiB", is: corrupt,
			build: patch("4k", func(q *qfile) { q.put64(offIncompatible, incompatExtendedL2) })},
	)

	// 17: compression type.
	add(
		hostile{name: "compression/type-2", want: "compression type 2 (only zlib and zstd exist)", is: unsupported,
			build: patch("zstd", func(q *qfile) { q.b[offCompression] = 2 })},
		hostile{name: "compression/zstd-without-feature-bit", want: "compression type zstd without the compression-type feature bit", is: corrupt,
			build: patch("zstd", func(q *qfile) { q.put64(offIncompatible, q.u64(offIncompatible)&^incompatCompressed) })},
	)

	// 18: extended L2 entries.
	extData := func(q *qfile) ref {
		return q.find("allocated extended entry", func(r ref) bool { return uint32(q.u64(r.at+8)) != 0 })
	}
	add(
		hostile{name: "extl2/allocated-and-zero", want: "marks subclusters both allocated and zero", is: corrupt,
			build: patch("extl2", func(q *qfile) {
				r := extData(q)
				bm := q.u64(r.at + 8)
				q.put64(r.at+8, bm|uint64(uint32(bm)&-uint32(bm))<<32) // lowest allocated subcluster also zero
			})},
		// qemu ignores bit 0 when subclusters are in use and reads the data;
		// go-qcow2reader reports the cluster as a Zero extent, which the
		// engine would skip.
		hostile{name: "extl2/zero-flag", want: "has the zero flag, which extended L2 entries do not use", is: corrupt,
			build: patch("extl2", func(q *qfile) {
				r := extData(q)
				q.put64(r.at, r.entry|l2ZeroFlag)
			})},
		hostile{name: "extl2/allocated-without-host", want: "allocated subclusters but no host cluster", is: corrupt,
			build: patch("extl2", func(q *qfile) { q.put64(extData(q).at, 0) })},
		hostile{name: "control/extl2-zero-subclusters", build: patch("extl2", func(q *qfile) {
			// The upper half of an allocated cluster's subclusters marked
			// zero instead of allocated: legal, and qemu reads zeros there.
			r := extData(q)
			alloc := uint32(q.u64(r.at+8)) & 0x0000ffff
			q.put64(r.at+8, uint64(0xffff0000)<<32|uint64(alloc))
		})},
	)

	// 19: tables stored after the data they map.
	add(
		// Open reads such an image like any other (want ""): only the
		// stream is limited.
		hostile{name: "stream/tables-after-data-spill-limit", want: "", streamWant: "seekable source", is: unsupported,
			opts: StreamOptions{SpillLimit: 1 << 20}, build: movedTables(c, "plain")},
		hostile{name: "stream/tables-after-data-4k-spill-limit", want: "", streamWant: "seekable source", is: unsupported,
			opts: StreamOptions{SpillLimit: 1 << 20}, build: movedTables(c, "4k")},
		hostile{name: "control/tables-after-data", build: movedTables(c, "plain")},
		hostile{name: "control/tables-after-data-4k", build: movedTables(c, "4k")},
	)

	for _, h := range cases {
		t.Run(h.name, func(t *testing.T) { runHostile(t, h) })
	}
}

// shortDescriptor rewrites the largest compressed cluster's L2 entry to
// span a single sector.
func shortDescriptor(c *corpus, base string) func(t *testing.T) string {
	return func(t *testing.T) string {
		q := c.load(t, base)
		r := q.largestCompressed()
		host, n := q.compressedLoc(r.entry)
		if n < 2048 {
			t.Fatalf("largest compressed cluster is only %d bytes", n)
		}
		q.put64(r.at, q.compressedEntry(host, 1))
		return writeImage(t, q.b)
	}
}

// movedTables copies the L1 table and the first L2 table to the end of the
// file, points the header and the L1 entry at the copies and wipes the
// originals: a valid image (qemu reads it) that a one-pass reader can only
// decode by holding the data until its tables arrive.
func movedTables(c *corpus, base string) func(t *testing.T) string {
	return func(t *testing.T) string {
		q := c.load(t, base)
		cs := q.clusterSize()
		oldL1, l1Bytes := q.l1Offset(), q.l1Size()*8
		l1 := make([]byte, (l1Bytes+cs-1)/cs*cs)
		copy(l1, q.b[oldL1:oldL1+l1Bytes])
		clear(q.b[oldL1 : oldL1+l1Bytes])
		newL1 := q.appendAligned(cs, l1)
		q.put64(offL1Offset, uint64(newL1))

		e := q.u64(newL1)
		oldL2 := int64(e & l1OffsetMask)
		if oldL2 == 0 {
			t.Fatal("first L1 entry is empty")
		}
		l2 := append([]byte(nil), q.b[oldL2:oldL2+cs]...)
		clear(q.b[oldL2 : oldL2+cs])
		newL2 := q.appendAligned(cs, l2)
		q.put64(newL1, e&^l1OffsetMask|uint64(newL2))
		if newL1 < 2<<20 {
			t.Fatalf("only %d bytes before the tables: not enough to exceed a 1 MiB spill limit", newL1)
		}
		return writeImage(t, q.b)
	}
}

func runHostile(t *testing.T, h hostile) {
	path := h.build(t)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if h.unchecked != nil {
		if n := h.unchecked(&qfile{t: t, b: data}); n < 1<<30 {
			t.Fatalf("case guards a %d byte allocation; make it gigabytes", n)
		} else {
			t.Logf("unchecked, this header would cost %d GiB", n>>30)
		}
	}
	streamWant := cmp.Or(h.streamWant, h.want)
	var want []byte
	if h.is == nil || h.want == "" || streamWant == "" {
		if want, err = os.ReadFile(testimg.RawOf(t, path)); err != nil {
			t.Fatal(err)
		}
	}
	budget := h.budget
	if budget == 0 {
		budget = hostileBudget
	}
	paths := []struct {
		name string
		run  func() ([]byte, error)
		want string
	}{
		{"Open(*os.File)", func() ([]byte, error) {
			f, err := os.Open(path)
			if err != nil {
				return nil, err
			}
			defer f.Close()
			return readAll(f, int64(len(data)), want != nil)
		}, h.want},
		{"Open(*bytes.Reader)", func() ([]byte, error) {
			return readAll(bytes.NewReader(data), int64(len(data)), want != nil)
		}, h.want},
		{"NewDecoder", func() ([]byte, error) {
			return decodeAll(onlyReader{bytes.NewReader(data)}, h.opts, want != nil)
		}, streamWant},
	}
	for _, p := range paths {
		got, err, alloc := measure(p.run)
		if alloc >= budget {
			t.Errorf("%s: allocated %d MiB, budget %d MiB", p.name, alloc>>20, budget>>20)
		}
		if h.is == nil || p.want == "" {
			if err != nil {
				t.Errorf("%s: control failed: %v", p.name, err)
			} else if !bytes.Equal(got, want) {
				t.Errorf("%s: content differs from qemu-img convert", p.name)
			}
			continue
		}
		switch {
		case err == nil:
			t.Errorf("%s: accepted a hostile image (want an error containing %q)", p.name, p.want)
		case !errors.Is(err, h.is):
			t.Errorf("%s: error %q does not wrap %q", p.name, err, h.is)
		case !strings.Contains(err.Error(), p.want):
			t.Errorf("%s: error %q does not contain %q", p.name, err, p.want)
		default:
			t.Logf("%s: %v (%d KiB allocated)", p.name, err, alloc>>10)
		}
	}
}

// measure runs fn and reports what it allocated; a panic becomes an error
// naming it, so that one case cannot take the others down.
func measure(fn func() ([]byte, error)) (out []byte, err error, alloc uint64) {
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	func() {
		defer func() {
			if r := recover(); r != nil {
				err = fmt.Errorf("PANIC: %v\n%s", r, debug.Stack())
			}
		}()
		out, err = fn()
	}()
	runtime.ReadMemStats(&after)
	return out, err, after.TotalAlloc - before.TotalAlloc
}

// readLimit bounds how much of an opened image readAll reads: a hostile
// image Open wrongly accepted may claim terabytes.
const readLimit = 64 << 20

// readAll opens ra, reads the disk in 1 MiB pieces and walks its extents,
// returning the first error, and the disk if keep is set.
func readAll(ra io.ReaderAt, size int64, keep bool) ([]byte, error) {
	img, err := Open(ra, size)
	if err != nil {
		return nil, err
	}
	defer img.Close()
	disk, err := readImage(img)
	if !keep {
		disk = nil
	}
	return disk, err
}

// errExtentLies marks an extent whose status contradicts the bytes: the
// engine skips Zero extents, so that would write zeros over data.
var errExtentLies = errors.New("test: an extent reported as zero holds data")

// readImage reads an opened image (up to readLimit) in 1 MiB pieces and
// checks every extent reported Zero against the bytes.
func readImage(img *Image) ([]byte, error) {
	end := min(img.Size(), readLimit)
	disk := make([]byte, end)
	for off := int64(0); off < end; off += 1 << 20 {
		n := min(1<<20, end-off)
		if _, err := img.ReadAt(disk[off:off+n], off); err != nil && !errors.Is(err, io.EOF) {
			return nil, err
		}
	}
	for off := int64(0); off < end; {
		e, err := img.Extent(off, end-off)
		if err != nil {
			return nil, fmt.Errorf("Extent(%d): %w", off, err)
		}
		if e.Length <= 0 {
			return nil, fmt.Errorf("Extent(%d) made no progress", off)
		}
		if e.Zero && slices.ContainsFunc(disk[off:min(off+e.Length, end)], func(b byte) bool { return b != 0 }) {
			return nil, fmt.Errorf("%w: %+v", errExtentLies, e)
		}
		off += e.Length
	}
	return disk, nil
}

// decodeAll streams r through NewDecoder into a checkSink.
func decodeAll(r io.Reader, opts StreamOptions, keep bool) ([]byte, error) {
	dec, h, err := NewDecoder(r, opts)
	if err != nil {
		return nil, err
	}
	s := &checkSink{size: dec.Size(), maxLen: 2 * h.ClusterSize}
	if keep {
		s.disk = make([]byte, dec.Size())
	}
	if err := dec.Run(s); err != nil {
		return nil, err
	}
	if s.broken != nil {
		return nil, s.broken
	}
	return s.disk, nil
}

// checkSink checks every chunk against the stream.Chunk contract, decodes it
// with codec.Decode and keeps it in disk if disk is set. A decoding error
// stops the decoder, as the engine's sink does.
type checkSink struct {
	size    int64
	maxLen  int64
	disk    []byte
	decoded int64
	limit   int64 // stop after this many decoded bytes; 0: no limit
	broken  error // a contract violation (a bug, not bad input)
}

var errSinkLimit = errors.New("test sink: decoded-data limit reached")

func (s *checkSink) Put(c stream.Chunk) error {
	switch {
	case c.Off < 0 || c.Off >= s.size || c.Len <= 0:
		s.broken = fmt.Errorf("chunk at %d (+%d) outside the %d byte disk", c.Off, c.Len, s.size)
	case int64(c.Len) > s.maxLen:
		s.broken = fmt.Errorf("chunk of %d bytes is larger than a cluster", c.Len)
	case c.Codec == stream.Raw && len(c.Payload) != c.Len:
		s.broken = fmt.Errorf("raw chunk of %d bytes has a %d byte payload", c.Len, len(c.Payload))
	}
	if s.broken != nil {
		return s.broken
	}
	buf := make([]byte, c.Len)
	n, err := codec.Decode(c.Codec, buf, c.Payload)
	if err != nil {
		return fmt.Errorf("chunk at %d: %w", c.Off, err)
	}
	if s.disk != nil {
		copy(s.disk[c.Off:], buf[:n])
	}
	s.decoded += int64(n)
	if s.limit > 0 && s.decoded > s.limit {
		return errSinkLimit
	}
	return nil
}
