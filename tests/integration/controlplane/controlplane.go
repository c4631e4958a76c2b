// Package controlplane runs a real etcd and kube-apiserver on loopback for
// integration tests: the same binaries a cluster runs, built from the Go
// module proxy, with a PKI made for the occasion and torn down afterwards.
package controlplane

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// ControlPlane is a running etcd + kube-apiserver.
type ControlPlane struct {
	// Dir holds the PKI, etcd's data, the kubeconfig and the logs.
	Dir string
	// Kubeconfig authenticates as a cluster admin (system:masters).
	Kubeconfig string
	// Config is a client config equivalent to Kubeconfig.
	Config *rest.Config
	// URL of the API server, https://127.0.0.1:<port>.
	URL string

	bins  *Binaries
	procs []*exec.Cmd
}

// Start starts etcd and kube-apiserver in dir and waits until the API server
// is ready. On error everything started so far is stopped again.
func Start(ctx context.Context, bins *Binaries, dir string) (cp *ControlPlane, err error) {
	cp = &ControlPlane{Dir: dir, bins: bins}
	defer func() {
		if err != nil {
			cp.Stop()
			err = fmt.Errorf("%w\n%s", err, cp.LogTails(30))
		}
	}()
	certs, err := newPKI(dir)
	if err != nil {
		return cp, err
	}

	etcdURL, err := cp.startEtcd(ctx)
	if err != nil {
		return cp, err
	}
	if err := cp.startAPIServer(ctx, certs, etcdURL); err != nil {
		return cp, err
	}
	if err := cp.writeKubeconfig(certs); err != nil {
		return cp, err
	}
	return cp, cp.waitReady(ctx, certs)
}

func (cp *ControlPlane) startEtcd(ctx context.Context) (string, error) {
	ports, err := freePorts(2)
	if err != nil {
		return "", err
	}
	client := "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peer := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	err = cp.spawn("etcd", cp.bins.Etcd,
		"--name=vimg-test",
		"--data-dir="+filepath.Join(cp.Dir, "etcd"),
		"--listen-client-urls="+client, "--advertise-client-urls="+client,
		"--listen-peer-urls="+peer, "--initial-advertise-peer-urls="+peer,
		"--initial-cluster=vimg-test="+peer,
		// Test data is thrown away: skipping fsync makes etcd several times
		// faster on this disk, and nothing here needs durability.
		"--unsafe-no-fsync",
		"--log-level=warn",
	)
	if err != nil {
		return "", err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(client + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return client, nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("etcd at %s not healthy after 30s: %v", client, err)
		}
		if err := ctx.Err(); err != nil {
			return "", err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (cp *ControlPlane) startAPIServer(_ context.Context, certs *pki, etcdURL string) error {
	ports, err := freePorts(1)
	if err != nil {
		return err
	}
	cp.URL = "https://127.0.0.1:" + strconv.Itoa(ports[0])
	return cp.spawn("kube-apiserver", cp.bins.KubeAPIServer,
		"--bind-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(ports[0]),
		"--etcd-servers="+etcdURL,
		"--cert-dir="+filepath.Join(cp.Dir, "apiserver-certs"),
		"--client-ca-file="+certs.CACert,
		"--tls-cert-file="+certs.ServingCert,
		"--tls-private-key-file="+certs.ServingKey,
		"--service-account-key-file="+certs.SAPub,
		"--service-account-signing-key-file="+certs.SAKey,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=10.96.0.0/12",
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--profiling=false",
		"--v=1",
	)
}

func (cp *ControlPlane) writeKubeconfig(certs *pki) error {
	cp.Kubeconfig = filepath.Join(cp.Dir, "admin.kubeconfig")
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["vimg-test"] = &clientcmdapi.Cluster{Server: cp.URL, CertificateAuthority: certs.CACert}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificate: certs.AdminCert, ClientKey: certs.AdminKey}
	cfg.Contexts["vimg-test"] = &clientcmdapi.Context{Cluster: "vimg-test", AuthInfo: "admin"}
	cfg.CurrentContext = "vimg-test"
	if err := clientcmd.WriteToFile(*cfg, cp.Kubeconfig); err != nil {
		return fmt.Errorf("write kubeconfig: %w", err)
	}
	rc, err := clientcmd.BuildConfigFromFlags("", cp.Kubeconfig)
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}
	rc.QPS, rc.Burst = 100, 200
	cp.Config = rc
	return nil
}

// waitReady polls /readyz with the admin certificate: the API server is ready
// once etcd is reachable and its bootstrap controllers (RBAC roles, priority
// classes, ...) are done.
func (cp *ControlPlane) waitReady(ctx context.Context, certs *pki) error {
	caPEM, err := os.ReadFile(certs.CACert)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	admin, err := tls.LoadX509KeyPair(certs.AdminCert, certs.AdminKey)
	if err != nil {
		return err
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{admin}},
	}}
	deadline := time.Now().Add(90 * time.Second)
	var last string
	for {
		resp, err := hc.Get(cp.URL + "/readyz")
		if err == nil {
			body := new(bytes.Buffer)
			_, _ = body.ReadFrom(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = fmt.Sprintf("HTTP %d: %s", resp.StatusCode, body.String())
		} else {
			last = err.Error()
		}
		for _, c := range cp.procs {
			if c.ProcessState != nil {
				return fmt.Errorf("%s exited: %s", filepath.Base(c.Path), c.ProcessState)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kube-apiserver not ready after 90s: %s", last)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// spawn starts a binary in its own process group with its output in
// <dir>/<name>.log.
func (cp *ControlPlane) spawn(name, bin string, args ...string) error {
	logf, err := os.Create(filepath.Join(cp.Dir, name+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", name, err)
	}
	cp.procs = append(cp.procs, cmd)
	go func() {
		_ = cmd.Wait() // fills ProcessState, which waitReady watches
		logf.Close()
	}()
	return nil
}

// Stop terminates the processes in reverse start order and waits for them.
func (cp *ControlPlane) Stop() {
	for i := len(cp.procs) - 1; i >= 0; i-- {
		c := cp.procs[i]
		if c.Process == nil {
			continue
		}
		_ = syscall.Kill(-c.Process.Pid, syscall.SIGTERM)
		deadline := time.Now().Add(10 * time.Second)
		for c.ProcessState == nil && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if c.ProcessState == nil {
			_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
		}
	}
	cp.procs = nil
}

// LogTails returns the last n lines of every process log, for failure reports.
func (cp *ControlPlane) LogTails(n int) string {
	var b strings.Builder
	logs, _ := filepath.Glob(filepath.Join(cp.Dir, "*.log"))
	for _, l := range logs {
		data, err := os.ReadFile(l)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > n {
			lines = lines[len(lines)-n:]
		}
		fmt.Fprintf(&b, "--- last lines of %s\n%s\n", filepath.Base(l), strings.Join(lines, "\n"))
	}
	return b.String()
}

// Kubectl runs the kubectl built with the control plane against it and
// returns stdout; a non-zero exit is an error carrying stderr.
func (cp *ControlPlane) Kubectl(ctx context.Context, stdin []byte, args ...string) (string, error) {
	full := append([]string{"--kubeconfig=" + cp.Kubeconfig, "--cache-dir=" + filepath.Join(cp.Dir, "kubectl-cache")}, args...)
	cmd := exec.CommandContext(ctx, cp.bins.Kubectl, full...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	if err := cmd.Run(); err != nil {
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return stdout.String(), fmt.Errorf("kubectl %s: exit %d: %s", strings.Join(args, " "), exit.ExitCode(), strings.TrimSpace(stderr.String()))
		}
		return stdout.String(), fmt.Errorf("kubectl %s: %w", strings.Join(args, " "), err)
	}
	return stdout.String(), nil
}

// freePorts asks the kernel for n distinct free loopback ports.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
