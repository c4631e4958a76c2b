//go:build e2e

// Package e2e tests vimg on the local cluster (tests/cluster). Run with
// `make e2e`, which brings the cluster up first.
package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"vimg.dev/vimg/tests/e2e/framework"
)

const busybox = "localhost/vimg-lab/busybox:1.35"

func pvc(name, class, mode string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: %s
spec:
  storageClassName: %s
  volumeMode: %s
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: 64Mi
`, name, class, mode)
}

// shellPod runs script in busybox with the claim at /data (Filesystem) or as
// the device /dev/xvda (Block).
func shellPod(name, claim, mode, script string) string {
	attach := "volumeMounts: [{name: vol, mountPath: /data}]"
	if mode == "Block" {
		attach = "volumeDevices: [{name: vol, devicePath: /dev/xvda}]"
	}
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: sh
    image: %s
    imagePullPolicy: Never
    command: [/bin/sh, -ec, %q]
    %s
  volumes:
  - name: vol
    persistentVolumeClaim: {claimName: %s}
`, name, busybox, script, attach, claim)
}

func TestStorage_DataWrittenByOnePodIsReadByTheNext(t *testing.T) {
	for _, class := range []string{"local-wffc", "local-immediate"} {
		for _, mode := range []string{"Filesystem", "Block"} {
			t.Run(class+"/"+mode, func(t *testing.T) {
				t.Parallel()
				f := framework.New(t)
				token := framework.RandToken()
				f.Apply(pvc("vol", class, mode))

				claim, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), "vol", metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if class == "local-wffc" {
					// Nothing consumes the claim yet: it must wait for a pod.
					if claim.Status.Phase != corev1.ClaimPending {
						t.Fatalf("a WaitForFirstConsumer claim is %s before any pod uses it", claim.Status.Phase)
					}
				} else {
					f.WaitFor("an Immediate claim to bind with no pod", 90*time.Second, func(ctx context.Context) (bool, error) {
						c, err := f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(ctx, "vol", metav1.GetOptions{})
						return err == nil && c.Status.Phase == corev1.ClaimBound, err
					})
				}

				write, read := "echo "+token+" > /data/token && sync", "cat /data/token"
				if mode == "Block" {
					// At 1 MiB into the device: proves a real block device,
					// not a file at its start.
					write = "echo " + token + " | dd of=/dev/xvda bs=1M seek=1 conv=notrunc,fsync 2>/dev/null"
					read = "dd if=/dev/xvda bs=1M skip=1 count=1 2>/dev/null | head -n1"
				}
				f.Apply(shellPod("writer", "vol", mode, write))
				f.WaitForPodPhase("writer", corev1.PodSucceeded, 2*time.Minute)
				f.Apply(shellPod("reader", "vol", mode, read))
				f.WaitForPodPhase("reader", corev1.PodSucceeded, 2*time.Minute)
				if got := strings.TrimSpace(f.PodLogs("reader")); got != token {
					t.Fatalf("the second pod read %q, want %q written by the first", got, token)
				}

				claim, err = f.Client.CoreV1().PersistentVolumeClaims(f.Namespace).Get(f.Ctx(time.Minute), "vol", metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				pv, err := f.Client.CoreV1().PersistentVolumes().Get(f.Ctx(time.Minute), claim.Spec.VolumeName, metav1.GetOptions{})
				if err != nil {
					t.Fatal(err)
				}
				if pv.Spec.CSI == nil || pv.Spec.CSI.Driver != "hostpath.test.vimg.dev" {
					t.Fatalf("PV %s is not provisioned by the test CSI driver: %+v", pv.Name, pv.Spec.PersistentVolumeSource)
				}
				if pv.Spec.NodeAffinity == nil || pv.Spec.NodeAffinity.Required == nil {
					t.Fatalf("PV %s of node-local storage has no node affinity", pv.Name)
				}
				if got := *pv.Spec.VolumeMode; string(got) != mode {
					t.Fatalf("PV volumeMode %s, want %s", got, mode)
				}
			})
		}
	}
}

func TestNetwork_ServiceReachesPodByClusterIPAndDNSName(t *testing.T) {
	t.Parallel()
	f := framework.New(t)
	token := framework.RandToken()
	f.Apply(fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: httpd
    image: %s
    imagePullPolicy: Never
    command: [/bin/sh, -ec, "mkdir -p /www && echo %s > /www/token && exec httpd -f -p 8080 -h /www"]
    ports: [{containerPort: 8080}]
    readinessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
`, busybox, token))
	f.WaitFor("pod web to be ready", 2*time.Minute, func(ctx context.Context) (bool, error) {
		p, err := f.Client.CoreV1().Pods(f.Namespace).Get(ctx, "web", metav1.GetOptions{})
		if err != nil {
			return false, err
		}
		for _, c := range p.Status.Conditions {
			if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue {
				return true, nil
			}
		}
		return false, nil
	})
	svc, err := f.Client.CoreV1().Services(f.Namespace).Get(f.Ctx(time.Minute), "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for name, url := range map[string]string{
		"by-ip":  fmt.Sprintf("http://%s/token", svc.Spec.ClusterIP),
		"by-dns": fmt.Sprintf("http://web.%s.svc.cluster.local/token", f.Namespace),
	} {
		t.Run(name, func(t *testing.T) {
			f := f.For(t)
			pod := "client-" + name
			f.Apply(fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
spec:
  restartPolicy: Never
  containers:
  - name: wget
    image: %s
    imagePullPolicy: Never
    # kube-proxy's rules and CoreDNS's records follow the endpoints a moment
    # after the server is ready: retry ten times, a second apart, as a real
    # client would.
    # Not wget -T: Debian's static busybox wget segfaults with it.
    command: [/bin/sh, -c, "for i in 1 2 3 4 5 6 7 8 9 10; do timeout 5 wget -q -O - %s && exit 0; sleep 1; done; exit 1"]
`, pod, busybox, url))
			f.WaitForPodPhase(pod, corev1.PodSucceeded, 2*time.Minute)
			if got := strings.TrimSpace(f.PodLogs(pod)); got != token {
				t.Fatalf("GET %s returned %q, want %q", url, got, token)
			}
		})
	}
}
