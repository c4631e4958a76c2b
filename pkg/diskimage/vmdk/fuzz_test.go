package vmdk

import (
	"bytes"
	"encoding/binary"
	"testing"

	"vimg.dev/vimg/pkg/diskimage/testimg"
)

// maxFuzzInput caps fuzz inputs: big enough for the seeds, small enough
// that every iteration is quick.
const maxFuzzInput = 1 << 20

// fuzzSeeds adds small images: a qemu-made streamOptimized image with the
// zero padding before its grains cut out, and compact images from
// synthVMDK (small grains, one-sector descriptor) in each layout. The
// fuzzer minimizes every new input it finds, which takes long on big ones:
// qemu's own files are 128 KiB and more.
func fuzzSeeds(f *testing.F) {
	testimg.Require(f, "qemu-img")
	qemu := compactSeed(mustRead(f, toVMDK(f, patternRaw(f, 1024, 11), "subformat=streamOptimized")))
	raw := mustRead(f, patternRaw(f, 6*kib, 12))
	sparse := synthVMDK(raw, 2, false)
	streamed := synthVMDK(raw, 2, true)
	zeroed := bytes.Clone(sparse)
	binary.LittleEndian.PutUint32(zeroed[8:], binary.LittleEndian.Uint32(zeroed[8:])|flagZeroGrain)
	binary.LittleEndian.PutUint32(zeroed[3*sectorSize:], zeroGrainGTE)
	for _, b := range [][]byte{qemu, sparse, streamed, zeroed, streamLayout(f, streamed, false)} {
		if len(b) > maxFuzzInput {
			f.Fatalf("seed of %d bytes is larger than the fuzz input cap", len(b))
		}
		f.Add(b)
	}
	f.Add([]byte("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 20480 FLAT \"x-flat.vmdk\" 0\n"))
}

// compactSeed removes the zeros qemu leaves between the last grain table
// and the first grain (it rounds the metadata up to a grain).
func compactSeed(b []byte) []byte {
	le := binary.LittleEndian
	h := parseHeader(b)
	grains := (h.capacity + h.grainSectors - 1) / h.grainSectors
	gdEntries := (grains + 511) / 512
	gdSectors := (gdEntries*4 + sectorSize - 1) / sectorSize
	metaEnd := h.gdOffset + gdSectors + gdEntries*gtBytes/sectorSize
	delta := h.overHead - metaEnd
	out := bytes.Clone(b[:metaEnd*sectorSize])
	out = append(out, b[h.overHead*sectorSize:]...)
	le.PutUint64(out[64:], metaEnd)
	// Shift the entries of both the primary and the redundant tables.
	for _, dir := range []uint64{h.gdOffset, h.rgdOffset} {
		for i := range gdEntries {
			gt := uint64(le.Uint32(out[dir*sectorSize+i*4:])) * sectorSize
			for k := range uint64(512) {
				if v := uint64(le.Uint32(out[gt+k*4:])); v >= h.overHead {
					le.PutUint32(out[gt+k*4:], uint32(v-delta))
				}
			}
		}
	}
	return out
}

// TestCompactSeed checks that compacted seeds still read like the original.
func TestCompactSeed(t *testing.T) {
	testimg.Require(t, "qemu-img")
	for _, opts := range []string{"subformat=monolithicSparse", "subformat=streamOptimized"} {
		q := toVMDK(t, patternRaw(t, 300*kib+512, 13), opts)
		p := writeFile(t, compactSeed(mustRead(t, q)))
		sameFiles(t, testimg.RawOf(t, q), testimg.RawOf(t, p))
		ref := testimg.RawOf(t, p)
		img, _ := openFile(t, p)
		compareReads(t, img, mustOpen(t, ref), 0, 7777, 7777)
		checkDecoder(t, p, ref, img.Info().Subformat)
	}
}

func FuzzOpen(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > maxFuzzInput {
			return
		}
		img, err := Open(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return
		}
		_ = img.Info()
		// Read at most 16 MiB of allocated data and walk at most 4096
		// extents: a header may claim a 64 TiB disk.
		_ = walkAll(img, 16<<20, 4096)
		_ = img.Close()
	})
}

func FuzzDecoder(f *testing.F) {
	fuzzSeeds(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > maxFuzzInput {
			return
		}
		// decodeAll checks every chunk lies inside the disk and decodes up
		// to 16 MiB of them.
		_ = decodeAll(data, 16<<20)
	})
}
