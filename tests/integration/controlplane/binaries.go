package controlplane

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
)

// ErrBinariesMissing says the upstream binaries have not been built yet.
var ErrBinariesMissing = errors.New("kube-apiserver/etcd/kubectl are not built: run `make k8s-binaries` (or `make test`, which builds them)")

// Binaries are the upstream programs a control plane runs.
type Binaries struct {
	Etcd, KubeAPIServer, Kubectl string
}

// repoRoot finds the repository from this source file, so tests work from any
// package directory.
func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..", ".."))
}

// FindBinaries locates the binaries: in VIMG_K8S_BIN_DIR / VIMG_ETCD_BIN_DIR
// when set (the Makefile sets them), else in the version-keyed cache that
// tests/cluster/build-binaries.sh fills.
func FindBinaries() (*Binaries, error) {
	k8sDir, err := binDir("VIMG_K8S_BIN_DIR", "k8s")
	if err != nil {
		return nil, err
	}
	etcdDir, err := binDir("VIMG_ETCD_BIN_DIR", "etcd")
	if err != nil {
		return nil, err
	}
	b := &Binaries{
		Etcd:          filepath.Join(etcdDir, "etcd"),
		KubeAPIServer: filepath.Join(k8sDir, "kube-apiserver"),
		Kubectl:       filepath.Join(k8sDir, "kubectl"),
	}
	for _, p := range []string{b.Etcd, b.KubeAPIServer, b.Kubectl} {
		if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
			return nil, fmt.Errorf("%w (missing %s)", ErrBinariesMissing, p)
		}
	}
	return b, nil
}

func binDir(env, which string) (string, error) {
	if d := os.Getenv(env); d != "" {
		return d, nil
	}
	script := filepath.Join(repoRoot(), "tests", "cluster", "build-binaries.sh")
	out, err := exec.Command(script, "--print-dir", which).Output()
	if err != nil {
		return "", fmt.Errorf("ask %s for the %s directory: %w", script, which, err)
	}
	return strings.TrimSpace(string(out)), nil
}
