// Package framework connects e2e tests to the local cluster (tests/cluster):
// a namespace per test, manifests applied with the cluster's kubectl, waits
// with timeouts that say what they waited for, and the namespace's events
// and pod logs printed when a test fails.
package framework

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Framework is one test's handle on the cluster.
type Framework struct {
	T          *testing.T
	Client     kubernetes.Interface
	Config     *rest.Config
	Kubeconfig string
	// Namespace is created for the test and deleted after it.
	Namespace string
}

// LabDir is the local cluster's working directory (see tests/cluster/lib.sh).
func LabDir() string {
	if d := os.Getenv("VIMG_LAB"); d != "" {
		return d
	}
	return "/var/lib/vimg-lab"
}

// New connects to the local cluster and creates the test's namespace. Without
// a reachable cluster the test skips, except in CI, where it fails.
func New(t *testing.T) *Framework {
	t.Helper()
	kubeconfig := os.Getenv("VIMG_KUBECONFIG")
	if kubeconfig == "" {
		kubeconfig = filepath.Join(LabDir(), "admin.kubeconfig")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	var client kubernetes.Interface
	if err == nil {
		cfg.QPS, cfg.Burst = 50, 100
		client, err = kubernetes.NewForConfig(cfg)
	}
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err = client.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{})
		cancel()
	}
	if err != nil {
		if os.Getenv("CI") == "" {
			t.Skipf("needs the local cluster (make cluster-up): %v", err)
		}
		t.Fatalf("no cluster to test against: %v", err)
	}
	f := &Framework{T: t, Client: client, Config: cfg, Kubeconfig: kubeconfig}
	f.Namespace = "e2e-" + shortName(t.Name()) + "-" + randSuffix()
	if _, err := client.CoreV1().Namespaces().Create(f.Ctx(time.Minute), &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: f.Namespace, Labels: map[string]string{"vimg.dev/e2e": "true"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	// Serviceaccounts appear shortly after the namespace: pods need one.
	f.WaitFor("the default serviceaccount", 30*time.Second, func(ctx context.Context) (bool, error) {
		_, err := client.CoreV1().ServiceAccounts(f.Namespace).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
	t.Cleanup(func() {
		if t.Failed() {
			f.DumpNamespace()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		policy := metav1.DeletePropagationForeground
		_ = client.CoreV1().Namespaces().Delete(ctx, f.Namespace, metav1.DeleteOptions{PropagationPolicy: &policy})
		// Wait, so that volumes are unpublished and deleted before the next
		// test (and before cluster-down).
		_ = wait.PollUntilContextCancel(ctx, time.Second, true, func(ctx context.Context) (bool, error) {
			_, err := client.CoreV1().Namespaces().Get(ctx, f.Namespace, metav1.GetOptions{})
			return err != nil, nil
		})
	})
	return f
}

// For returns the framework bound to a subtest of its test, so that a
// failure stops the subtest that saw it; the namespace stays the parent's.
func (f *Framework) For(t *testing.T) *Framework {
	c := *f
	c.T = t
	return &c
}

// Ctx is a context that ends with the test or after d.
func (f *Framework) Ctx(d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	f.T.Cleanup(cancel)
	return ctx
}

// Kubectl runs the cluster's kubectl in the test namespace and returns its
// stdout; a failure fails the test.
func (f *Framework) Kubectl(stdin string, args ...string) string {
	f.T.Helper()
	out, err := f.TryKubectl(stdin, args...)
	if err != nil {
		f.T.Fatal(err)
	}
	return out
}

// TryKubectl is Kubectl that returns the error instead.
func (f *Framework) TryKubectl(stdin string, args ...string) (string, error) {
	bin := filepath.Join(LabDir(), "bin", "kubectl")
	full := append([]string{"--kubeconfig=" + f.Kubeconfig, "-n", f.Namespace}, args...)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, full...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// Apply applies YAML manifests in the test namespace.
func (f *Framework) Apply(manifests string) {
	f.T.Helper()
	f.Kubectl(manifests, "apply", "-f", "-")
}

// WaitFor polls cond every 500ms until it is true, fails the test after
// timeout naming what it waited for, and stops early on cond's error.
func (f *Framework) WaitFor(what string, timeout time.Duration, cond func(ctx context.Context) (bool, error)) {
	f.T.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var lastErr error
	err := wait.PollUntilContextCancel(ctx, 500*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		ok, err := cond(ctx)
		if err != nil {
			lastErr = err
		}
		return ok, nil
	})
	if err != nil {
		f.T.Fatalf("timed out after %s waiting for %s (last error: %v)", timeout, what, lastErr)
	}
}

// WaitForPodPhase waits until the pod reaches phase; a pod that ends in the
// other terminal phase fails the test at once with its logs.
func (f *Framework) WaitForPodPhase(name string, phase corev1.PodPhase, timeout time.Duration) *corev1.Pod {
	f.T.Helper()
	var pod *corev1.Pod
	f.WaitFor(fmt.Sprintf("pod %s to be %s", name, phase), timeout, func(ctx context.Context) (bool, error) {
		p, err := f.Client.CoreV1().Pods(f.Namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		pod = p
		if p.Status.Phase == phase {
			return true, nil
		}
		if (p.Status.Phase == corev1.PodFailed || p.Status.Phase == corev1.PodSucceeded) && p.Status.Phase != phase {
			f.T.Fatalf("pod %s ended %s, want %s; logs:\n%s", name, p.Status.Phase, phase, f.PodLogs(name))
		}
		return false, nil
	})
	return pod
}

// PodLogs returns the logs of a pod's first container.
func (f *Framework) PodLogs(name string) string {
	data, err := f.Client.CoreV1().Pods(f.Namespace).GetLogs(name, &corev1.PodLogOptions{}).Do(f.Ctx(30 * time.Second)).Raw()
	if err != nil {
		return fmt.Sprintf("<logs of %s: %v>", name, err)
	}
	return string(data)
}

// DumpNamespace prints what a person debugging a failure looks at first.
func (f *Framework) DumpNamespace() {
	for _, args := range [][]string{
		{"get", "all,pvc,events", "-o", "wide"},
		{"describe", "pods,pvc"},
	} {
		out, err := f.TryKubectl("", args...)
		f.T.Logf("kubectl %s:\n%s%v", strings.Join(args, " "), out, errOrEmpty(err))
	}
	pods, err := f.Client.CoreV1().Pods(f.Namespace).List(f.Ctx(30*time.Second), metav1.ListOptions{})
	if err == nil {
		for _, p := range pods.Items {
			f.T.Logf("logs of pod %s:\n%s", p.Name, f.PodLogs(p.Name))
		}
	}
}

func errOrEmpty(err error) any {
	if err == nil {
		return ""
	}
	return err
}

// shortName makes a DNS-label fragment of a test name.
func shortName(s string) string {
	s = strings.ToLower(s)
	var b strings.Builder
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
			b.WriteRune(r)
		case b.Len() > 0 && !strings.HasSuffix(b.String(), "-"):
			b.WriteByte('-')
		}
	}
	out := strings.Trim(b.String(), "-")
	if len(out) > 40 {
		out = strings.Trim(out[:40], "-")
	}
	return out
}

// RandToken is a random hex string, for data that must be told apart.
func RandToken() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func randSuffix() string { return RandToken()[:5] }
