package layout

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/distribution/reference"

	"vimg.dev/vimg/pkg/diskimage/testimg"
)

func TestRepository_ValidStableAndDistinct(t *testing.T) {
	long := func(c byte, n int) string { return strings.Repeat(string(c), n) }
	// A 253-character subdomain: labels of 63 separated by dots.
	name253 := long('a', 63) + "." + long('b', 63) + "." + long('c', 63) + "." + long('d', 61)
	name253b := name253[:252] + "e"
	ns63 := long('n', 63)
	cases := []struct {
		kind, ns, name string
		want           string // "" means: only check validity
	}{
		{"vi", "default", "ubuntu", "vi/default/ubuntu"},
		{"cvi", "", "ubuntu-22.04", "cvi/ubuntu-22.04"},
		{"cvi", "ignored", "a.b.c", "cvi/a.b.c"},
		{"vi", "ns", "x--y.z", "vi/ns/x--y.z"},
		{"vi", ns63, name253, ""},
		{"vi", ns63, name253b, ""},
		{"cvi", "", name253, ""},
	}
	seen := map[string]string{}
	for _, c := range cases {
		repo := Repository(c.kind, c.ns, c.name)
		if c.want != "" && repo != c.want {
			t.Errorf("Repository(%q, %q, %q) = %q, want %q", c.kind, c.ns, c.name, repo, c.want)
		}
		if len(repo) > MaxRepositoryLength {
			t.Errorf("Repository(%q, %q, %d chars) is %d characters long", c.kind, c.ns, len(c.name), len(repo))
		}
		ref, err := reference.Parse(repo + ":" + Tag("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"))
		if err != nil {
			t.Errorf("Repository(%q, %q, %d chars) = %q: invalid reference: %v", c.kind, c.ns, len(c.name), repo, err)
			continue
		}
		if got := ref.(reference.Named).Name(); got != repo {
			t.Errorf("reference name of %q is %q", repo, got)
		}
		if again := Repository(c.kind, c.ns, c.name); again != repo {
			t.Errorf("Repository is not stable: %q then %q", repo, again)
		}
		key := c.kind + "/" + c.ns + "/" + c.name
		if c.kind == "cvi" {
			key = "cvi/" + c.name
		}
		if prev, ok := seen[repo]; ok && prev != key {
			t.Errorf("%q and %q both map to %q", prev, key, repo)
		}
		seen[repo] = key
	}
	name250 := long('z', 63) + "." + long('y', 63) + "." + long('x', 63) + "." + long('w', 58)
	if got := Repository("vi", "a", name250); got != "vi/a/"+name250 {
		t.Errorf("a 255-character repository was changed to %q", got)
	}
	short := Repository("vi", ns63, name253)
	if !strings.Contains(short, "__") || !strings.HasPrefix(short, "vi/"+ns63+"/aaaa") {
		t.Errorf("shortened repository %q should keep the name's start and end in __<hash>", short)
	}
	if got := Repository("pod", "a", "b"); got != "" {
		t.Errorf("unknown kind gave %q, want empty", got)
	}
	// Names the API server would refuse still give valid, distinct results.
	a, b := Repository("vi", "ns", "Upper_Case"), Repository("vi", "ns", "upper_case")
	if a == b {
		t.Errorf("different invalid names map to the same repository %q", a)
	}
	for _, r := range []string{a, b} {
		if _, err := reference.Parse(r); err != nil {
			t.Errorf("%q: %v", r, err)
		}
	}
}

func TestMeta_AnnotationsRoundTrip(t *testing.T) {
	m := Meta{Format: FormatQcow2, VirtualSize: 10 << 30, StoredSize: 123456, SourceChecksum: "sha256:abc"}
	got, err := MetaFromAnnotations(m.Annotations())
	if err != nil {
		t.Fatal(err)
	}
	m.FileName = "disk.qcow2"
	if got != m {
		t.Errorf("round trip: got %+v, want %+v", got, m)
	}
	if FileNameFor(FormatRaw) != "disk.img" || FileNameFor(FormatISO) != "disk.iso" {
		t.Errorf("file names: raw %q iso %q", FileNameFor(FormatRaw), FileNameFor(FormatISO))
	}
	for _, bad := range []map[string]string{
		{},
		{KeyFormat: "qcow2", KeyVirtualSize: "1"},
		{KeyFormat: "qcow2", KeyVirtualSize: "-1", KeyStoredSize: "1"},
		{KeyFormat: "zip", KeyVirtualSize: "1", KeyStoredSize: "1"},
		{KeyFormat: "raw", KeyVirtualSize: "1", KeyStoredSize: "1", KeyFileName: "../x"},
	} {
		if _, err := MetaFromAnnotations(bad); err == nil {
			t.Errorf("MetaFromAnnotations(%v) succeeded", bad)
		}
	}
}

func TestConfigAndManifest_Reproducible(t *testing.T) {
	m := Meta{Format: FormatRaw, VirtualSize: 1 << 20, StoredSize: 1 << 20}
	a, err := Config(m, "sha256:0000000000000000000000000000000000000000000000000000000000000000")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := Config(m, "sha256:0000000000000000000000000000000000000000000000000000000000000000")
	if !bytes.Equal(a, b) {
		t.Errorf("config differs between calls:\n%s\n%s", a, b)
	}
	for _, want := range []string{`"vimg.dev/format":"raw"`, `"vimg.dev/virtual-size":"1048576"`, `"architecture":"amd64"`, `"diff_ids":["sha256:0000`} {
		if !bytes.Contains(a, []byte(want)) {
			t.Errorf("config %s lacks %s", a, want)
		}
	}
}

// layerOf builds a whole layer in memory.
func layerOf(t *testing.T, name string, data []byte) (layer []byte, header int) {
	t.Helper()
	h, err := Header(name, int64(len(data)))
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	b.Write(h)
	b.Write(data)
	b.Write(Trailer(int64(len(data))))
	return b.Bytes(), len(h)
}

func TestHeaderTrailer_RoundTripThroughArchiveTar(t *testing.T) {
	for _, size := range []int{0, 1, 511, 512, 513, 3<<20 + 7} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			data := make([]byte, size)
			for i := range data {
				data[i] = byte(i*7 + i>>9)
			}
			layer, hlen := layerOf(t, "disk.qcow2", data)
			if len(layer)%512 != 0 {
				t.Errorf("layer length %d is not a multiple of 512", len(layer))
			}
			again, _ := layerOf(t, "disk.qcow2", data)
			if !bytes.Equal(layer, again) {
				t.Error("the same content gave different layers")
			}
			tr := tar.NewReader(bytes.NewReader(layer))
			dir, err := tr.Next()
			if err != nil {
				t.Fatal(err)
			}
			if dir.Name != "disk/" || dir.Typeflag != tar.TypeDir || dir.Uid != 107 || dir.Gid != 107 || dir.Mode != 0o555 {
				t.Errorf("directory entry %+v", dir)
			}
			f, err := tr.Next()
			if err != nil {
				t.Fatal(err)
			}
			if f.Name != "disk/disk.qcow2" || f.Typeflag != tar.TypeReg || f.Uid != 107 || f.Gid != 107 || f.Mode != 0o440 || f.Size != int64(size) || !f.ModTime.Equal(Created) {
				t.Errorf("file entry %+v", f)
			}
			got, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Error("file content differs")
			}
			if _, err := tr.Next(); err != io.EOF {
				t.Errorf("after the disk file: %v, want io.EOF", err)
			}
			off, n, name, err := ParseDiskOffset(layer[:min(len(layer), MaxHeaderSize)])
			if err != nil {
				t.Fatal(err)
			}
			if off != int64(hlen) || n != int64(size) || name != "disk/disk.qcow2" {
				t.Errorf("ParseDiskOffset = %d, %d, %q; want %d, %d, disk/disk.qcow2", off, n, name, hlen, size)
			}
			if !bytes.Equal(layer[off:off+n], data) {
				t.Error("bytes at the parsed offset are not the disk file")
			}
		})
	}
}

// TestHeader_NineGiBFileListedByGNUTar checks the PAX size record with GNU
// tar itself. The 9 GiB of data are a hole in a sparse file.
func TestHeader_NineGiBFileListedByGNUTar(t *testing.T) {
	tarBin := testimg.Require(t, "tar")
	const size = 9 << 30
	h, err := Header("disk.img", size)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "layer.tar")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	tail := Trailer(size)
	end := int64(len(h)) + size
	if _, err := f.WriteAt(h, 0); err != nil {
		t.Fatal(err)
	}
	// Data in the last byte of the disk proves tar reads the size right:
	// a wrong size would put this byte into the next header block.
	if _, err := f.WriteAt([]byte{1}, end-1); err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(tail, end); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	off, n, name, err := ParseDiskOffset(h)
	if err != nil || off != int64(len(h)) || n != size || name != "disk/disk.img" {
		t.Errorf("ParseDiskOffset = %d, %d, %q, %v", off, n, name, err)
	}
	for _, args := range [][]string{{"-tvf", path}, {"--numeric-owner", "-tvf", path}} {
		out, err := exec.Command(tarBin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("tar %v: %v\n%s", args, err, out)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		if len(lines) != 2 {
			t.Fatalf("tar %v listed %d entries:\n%s", args, len(lines), out)
		}
		if !strings.HasPrefix(lines[0], "dr-xr-xr-x 107/107") || !strings.HasSuffix(lines[0], " disk/") {
			t.Errorf("directory line %q", lines[0])
		}
		if !strings.HasPrefix(lines[1], "-r--r----- 107/107") || !strings.Contains(lines[1], fmt.Sprintf(" %d ", int64(size))) || !strings.HasSuffix(lines[1], " disk/disk.img") {
			t.Errorf("file line %q, want mode -r--r-----, owner 107/107, size %d, name disk/disk.img", lines[1], int64(size))
		}
	}
}

func TestParseDiskOffset_RefusesHostileHeaders(t *testing.T) {
	entry := func(hs ...*tar.Header) []byte {
		var b bytes.Buffer
		tw := tar.NewWriter(&b)
		for _, h := range hs {
			if err := tw.WriteHeader(h); err != nil {
				t.Fatal(err)
			}
			if h.Typeflag == tar.TypeReg && h.Size > 0 {
				tw.Write(make([]byte, h.Size))
			}
		}
		tw.Close()
		return b.Bytes()
	}
	reg := func(name string) *tar.Header {
		return &tar.Header{Typeflag: tar.TypeReg, Name: name, Size: 1, Mode: 0o440}
	}
	dir := &tar.Header{Typeflag: tar.TypeDir, Name: "disk/", Mode: 0o555}
	negative, _ := Header("disk.img", 1)
	blk := negative[512:1024]
	for i := 124; i < 136; i++ {
		blk[i] = 0xff // base-256 -1
	}
	setChecksum(blk)
	bigPAX := reg("disk/disk.img")
	bigPAX.PAXRecords = map[string]string{"comment": strings.Repeat("x", 70<<10)}
	// archive/tar does not write sparse files: patch the type flags of
	// ordinary entries into a PAX 1.0 sparse file and a GNU sparse file.
	paxData := paxRecord("GNU.sparse.major", "1") + paxRecord("GNU.sparse.minor", "0") +
		paxRecord("GNU.sparse.name", "disk/disk.img") + paxRecord("GNU.sparse.realsize", "512")
	sparseMap := "1\n0\n512\n"
	sparse := entry(dir,
		&tar.Header{Typeflag: tar.TypeReg, Name: "disk/PaxHeaders/disk.img", Size: int64(len(paxData))},
		&tar.Header{Typeflag: tar.TypeReg, Name: "disk/GNUSparseFile.0/disk.img", Size: 1024})
	retype(sparse[512:1024], 'x')
	copy(sparse[512+512:], paxData)
	copy(sparse[2048:], sparseMap)
	gnuSparse := entry(dir, &tar.Header{Typeflag: tar.TypeReg, Name: "disk/disk.img", Size: 1, Format: tar.FormatGNU})
	retype(gnuSparse[512:1024], 'S')
	cases := map[string][]byte{
		"absolute":        entry(reg("/disk/disk.img")),
		"dotdot":          entry(dir, reg("disk/../etc/passwd")),
		"outside disk":    entry(reg("etc/passwd")),
		"nested":          entry(dir, reg("disk/a/b.img")),
		"other dir":       entry(&tar.Header{Typeflag: tar.TypeDir, Name: "etc/"}),
		"symlink":         entry(dir, &tar.Header{Typeflag: tar.TypeSymlink, Name: "disk/disk.img", Linkname: "/etc/shadow"}),
		"hardlink":        entry(dir, &tar.Header{Typeflag: tar.TypeLink, Name: "disk/disk.img", Linkname: "disk/x"}),
		"char device":     entry(dir, &tar.Header{Typeflag: tar.TypeChar, Name: "disk/disk.img"}),
		"PAX over 64 KiB": entry(dir, bigPAX),
		"PAX sparse":      sparse,
		"GNU sparse":      gnuSparse,
		"negative size":   negative,
		"truncated":       entry(dir, reg("disk/disk.img"))[:700],
		"empty":           nil,
		"garbage":         bytes.Repeat([]byte{0x5a}, 4096),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			off, n, file, err := ParseDiskOffset(b)
			if err == nil {
				t.Errorf("accepted: offset %d size %d name %q", off, n, file)
			} else {
				t.Logf("refused: %v", err)
			}
		})
	}
}

func paxRecord(k, v string) string {
	rec := " " + k + "=" + v + "\n"
	n := len(rec) + 1
	for len(fmt.Sprint(n))+len(rec) != n {
		n++
	}
	return fmt.Sprint(n) + rec
}

func retype(blk []byte, flag byte) {
	blk[156] = flag
	setChecksum(blk)
}

func setChecksum(blk []byte) {
	for i := 148; i < 156; i++ {
		blk[i] = ' '
	}
	var sum int64
	for _, c := range blk {
		sum += int64(c)
	}
	copy(blk[148:], fmt.Sprintf("%06o\x00 ", sum))
}
