//go:build e2e

package e2e

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"vimg.dev/vimg/tests/e2e/framework"
)

// TestWorkerAccount_MayOnlyWriteItsOwnPodsProgress: what an import pod's
// token can do, checked against the deployed RBAC and admission policy by
// impersonating the worker's service account with the pod name its token
// carries: its own pod's vimg.dev/progress annotation, and nothing else.
func TestWorkerAccount_MayOnlyWriteItsOwnPodsProgress(t *testing.T) {
	f := framework.New(t)
	ctx := f.Ctx(time.Minute)
	pods, err := f.Client.CoreV1().Pods("vimg-system").List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=vimg-controller"})
	if err != nil || len(pods.Items) == 0 {
		t.Fatalf("no pod to try on: %v", err)
	}
	target := pods.Items[0].Name
	as := func(podName string) kubernetes.Interface {
		cfg := rest.CopyConfig(f.Config)
		cfg.Impersonate = rest.ImpersonationConfig{
			UserName: "system:serviceaccount:vimg-system:vimg-worker",
			Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:vimg-system", "system:authenticated"},
			Extra:    map[string][]string{"authentication.kubernetes.io/pod-name": {podName}},
		}
		c, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	patch := func(c kubernetes.Interface, body string) error {
		_, err := c.CoreV1().Pods("vimg-system").Patch(ctx, target, types.MergePatchType, []byte(body), metav1.PatchOptions{})
		return err
	}
	t.Cleanup(func() {
		_ = patch(f.Client, `{"metadata":{"annotations":{"vimg.dev/progress":null}}}`)
	})
	self, other := as(target), as("some-other-pod")

	if err := patch(self, `{"metadata":{"annotations":{"vimg.dev/progress":"{\"fraction\":0.5}"}}}`); err != nil {
		t.Fatalf("a worker writing its own progress was refused: %v", err)
	}
	refused := []struct {
		what string
		c    kubernetes.Interface
		body string
		says string
	}{
		{"another pod's progress", other, `{"metadata":{"annotations":{"vimg.dev/progress":"{}"}}}`, "only its own pod"},
		{"a label of its own pod", self, `{"metadata":{"labels":{"evil":"yes"}}}`, "may not change labels"},
		{"another annotation of its own pod", self, `{"metadata":{"annotations":{"evil":"yes"}}}`, "only the vimg.dev/progress annotation"},
	}
	for _, r := range refused {
		err := patch(r.c, r.body)
		if err == nil || !strings.Contains(err.Error(), r.says) {
			t.Errorf("a worker changing %s: %v, want a refusal saying %q", r.what, err, r.says)
		}
	}
	if _, err := self.CoreV1().Secrets("vimg-system").List(ctx, metav1.ListOptions{}); err == nil {
		t.Error("the worker account can list secrets")
	}
	if _, err := self.CoreV1().Pods("vimg-system").List(ctx, metav1.ListOptions{}); err == nil {
		t.Error("the worker account can list pods")
	}
}
