// Command imgtool packs local files into a single-layer container image and
// writes it as a docker-archive tarball that `ctr images import` loads: the
// test cluster runs only images built on the machine, never pulled ones.
//
//	imgtool -ref localhost/vimg-lab/pause:3.10 -out pause.tar -file bin/pause:/pause -entrypoint /pause
package main

import (
	"archive/tar"
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

type multi []string

func (m *multi) String() string     { return strings.Join(*m, ",") }
func (m *multi) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	var files, links, env multi
	ref := flag.String("ref", "", "image reference, e.g. localhost/vimg-lab/pause:3.10")
	out := flag.String("out", "", "docker-archive tarball to write")
	entrypoint := flag.String("entrypoint", "", "entrypoint, space separated")
	user := flag.String("user", "", "user to run as, e.g. 65534:65534")
	flag.Var(&files, "file", "HOST[:IMAGE] file to add (repeatable); IMAGE defaults to HOST")
	flag.Var(&links, "symlink", "LINK=TARGET symlink to add (repeatable)")
	flag.Var(&env, "env", "KEY=VALUE environment variable (repeatable)")
	flag.Parse()
	if *ref == "" || *out == "" {
		fmt.Fprintln(os.Stderr, "imgtool: -ref and -out are required")
		os.Exit(2)
	}
	if err := run(*ref, *out, *entrypoint, *user, files, links, env); err != nil {
		fmt.Fprintln(os.Stderr, "imgtool:", err)
		os.Exit(1)
	}
}

func run(ref, out, entrypoint, user string, files, links, env []string) error {
	tag, err := name.NewTag(ref)
	if err != nil {
		return fmt.Errorf("parse -ref: %w", err)
	}
	layerTar, err := buildLayer(files, links)
	if err != nil {
		return err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return fmt.Errorf("make layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", "amd64"
	cfg.Config.Env = append([]string{"PATH=/bin:/usr/bin:/sbin:/usr/sbin"}, env...)
	if entrypoint != "" {
		cfg.Config.Entrypoint = strings.Fields(entrypoint)
	}
	cfg.Config.User = user
	img, err = mutate.ConfigFile(img, cfg)
	if err != nil {
		return err
	}
	if err := tarball.WriteToFile(out, tag, img); err != nil {
		return fmt.Errorf("write %s: %w", out, err)
	}
	return nil
}

// buildLayer makes the root filesystem: the directories and account files
// programs expect, then the requested files and symlinks. Entries are sorted
// and timestamps fixed so the same inputs give the same image digest.
func buildLayer(files, links []string) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	epoch := time.Unix(0, 0)
	dirs := map[string]bool{}
	addDir := func(p string) error {
		for _, d := range parents(p) {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			mode := int64(0o755)
			if d == "tmp" {
				mode = 0o1777
			}
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: mode, ModTime: epoch}); err != nil {
				return err
			}
		}
		return nil
	}
	addFile := func(p string, mode int64, data []byte) error {
		if err := addDir(path.Dir(p)); err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: p, Mode: mode, Size: int64(len(data)), ModTime: epoch}); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	for _, d := range []string{"dev", "proc", "sys", "etc", "tmp", "var/run", "data"} {
		if err := addDir(d); err != nil {
			return nil, err
		}
	}
	// qemu (107) is the user KubeVirt's disk images belong to.
	if err := addFile("etc/passwd", 0o644, []byte("root:x:0:0:root:/:/bin/sh\nqemu:x:107:107:qemu:/:/sbin/nologin\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n")); err != nil {
		return nil, err
	}
	if err := addFile("etc/group", 0o644, []byte("root:x:0:\nqemu:x:107:\nnogroup:x:65534:\n")); err != nil {
		return nil, err
	}
	sort.Strings(files)
	for _, f := range files {
		host, dest, ok := strings.Cut(f, ":")
		if !ok {
			dest = host
		}
		dest = strings.TrimPrefix(path.Clean("/"+dest), "/")
		data, err := os.ReadFile(host)
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", host, err)
		}
		st, err := os.Stat(host)
		if err != nil {
			return nil, err
		}
		if err := addFile(dest, int64(st.Mode().Perm()), data); err != nil {
			return nil, fmt.Errorf("add %s: %w", dest, err)
		}
	}
	sort.Strings(links)
	for _, l := range links {
		link, target, ok := strings.Cut(l, "=")
		if !ok {
			return nil, fmt.Errorf("-symlink %q: want LINK=TARGET", l)
		}
		link = strings.TrimPrefix(path.Clean("/"+link), "/")
		if err := addDir(path.Dir(link)); err != nil {
			return nil, err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: link, Linkname: target, Mode: 0o777, ModTime: epoch}); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// parents lists p and its ancestors, outermost first: "a/b" → ["a", "a/b"].
func parents(p string) []string {
	p = strings.Trim(path.Clean(p), "/")
	if p == "" || p == "." {
		return nil
	}
	var out []string
	for i := range p {
		if p[i] == '/' {
			out = append(out, p[:i])
		}
	}
	return append(out, p)
}
