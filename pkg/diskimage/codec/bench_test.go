package codec

import (
	"bytes"
	stdflate "compress/flate"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"

	"vimg.dev/vimg/pkg/diskimage/stream"
)

// benchCorpus is up to 32 MiB of the machine's own shared libraries and
// programs, cut into 64 KiB clusters: the kind of data an OS disk image is
// made of. Clusters that are all zeros are left out, as qcow2 does not store
// them compressed.
func benchCorpus(b *testing.B) [][]byte {
	corpusOnce.Do(func() { corpus = loadCorpus() })
	if len(corpus) < 16 {
		b.Skip("not enough binaries on this machine for a corpus")
	}
	return corpus
}

var (
	corpusOnce sync.Once
	corpus     [][]byte
)

func loadCorpus() [][]byte {
	var files []string
	for _, g := range []string{"/usr/lib/x86_64-linux-gnu/*.so*", "/usr/bin/*"} {
		m, _ := filepath.Glob(g)
		files = append(files, m...)
	}
	sort.Strings(files)
	var all []byte
	for _, f := range files {
		if fi, err := os.Stat(f); err != nil || !fi.Mode().IsRegular() || fi.Size() < 256<<10 {
			continue
		}
		data, err := os.ReadFile(f)
		if err == nil {
			all = append(all, data...)
		}
		if len(all) >= 32<<20 {
			break
		}
	}
	var clusters [][]byte
	zero := make([]byte, 64<<10)
	for len(all) >= 64<<10 {
		if c := all[:64<<10]; !bytes.Equal(c, zero) {
			clusters = append(clusters, c)
		}
		all = all[64<<10:]
	}
	return clusters
}

func benchDecode(b *testing.B, c stream.Codec, compress func([]byte) []byte, dec func(dst, src []byte) (int, error)) {
	clusters := benchCorpus(b)
	payloads := make([][]byte, len(clusters))
	var in int
	for i, c := range clusters {
		payloads[i] = compress(c)
		in += len(payloads[i])
	}
	dst := make([]byte, 64<<10)
	b.SetBytes(64 << 10)
	for i := 0; b.Loop(); i++ {
		p := payloads[i%len(payloads)]
		if n, err := dec(dst, p); err != nil || n != len(dst) {
			b.Fatalf("n=%d err=%v", n, err)
		}
	}
	b.ReportMetric(float64(in)/float64(len(clusters)<<16), "ratio")
}

func deflate6(d []byte) []byte {
	var b bytes.Buffer
	w, _ := stdflate.NewWriter(&b, 6)
	w.Write(d)
	w.Close()
	return b.Bytes()
}

// BenchmarkDecodeDeflate64K measures qcow2-style clusters (raw deflate,
// level 6) through libdeflate (cgo builds) and klauspost/compress.
func BenchmarkDecodeDeflate64K(b *testing.B) {
	for name, inf := range inflaters() {
		b.Run(name, func(b *testing.B) {
			benchDecode(b, stream.Deflate, deflate6, func(dst, src []byte) (int, error) { return inf(false, dst, src) })
		})
	}
}

// BenchmarkDecodeZstd64K is the same corpus as zstd frames (qcow2
// compression_type=zstd).
func BenchmarkDecodeZstd64K(b *testing.B) {
	e, _ := zstd.NewWriter(nil)
	benchDecode(b, stream.Zstd, func(d []byte) []byte { return e.EncodeAll(d, nil) }, func(dst, src []byte) (int, error) {
		return Decode(stream.Zstd, dst, src)
	})
}
