package worker

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"k8s.io/klog/v2"

	"vimg.dev/vimg/pkg/worker/api"
)

// ServeConfig is what a serve pod serves: the first Size bytes of the file
// at Path, to readers showing Token, on Addr.
type ServeConfig struct {
	Path  string
	Size  int64
	Token string
	Addr  string
}

// Serve serves an image stored in a claim to the populate pods copying it,
// until ctx ends.
func Serve(ctx context.Context, cfg ServeConfig) error {
	if len(cfg.Token) < 32 {
		return errors.New("serve: a token of at least 32 characters is required")
	}
	if cfg.Size <= 0 {
		return fmt.Errorf("serve: the image's size %d is not positive", cfg.Size)
	}
	l, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: ServeHandler(cfg), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	klog.FromContext(ctx).Info("Serving the image", "path", cfg.Path, "size", cfg.Size, "addr", l.Addr().String())
	if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// ServeHandler answers GET and HEAD of api.ServePath, with ranges, for
// requests bearing the token; /healthz answers anyone, once the disk can
// be opened and is large enough.
func ServeHandler(cfg ServeConfig) http.Handler {
	open := func() (*os.File, io.ReadSeeker, error) {
		f, err := os.Open(cfg.Path)
		if err != nil {
			return nil, nil, err
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, nil, err
		}
		if fi.Size() < cfg.Size {
			f.Close()
			return nil, nil, fmt.Errorf("%s holds %d bytes, less than the image's %d", cfg.Path, fi.Size(), cfg.Size)
		}
		return f, io.NewSectionReader(f, 0, cfg.Size), nil
	}
	want := []byte("Bearer " + cfg.Token)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		f, _, err := open()
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		f.Close()
	})
	mux.HandleFunc(api.ServePath, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "read-only", http.StatusMethodNotAllowed)
			return
		}
		if subtle.ConstantTimeCompare([]byte(strings.TrimSpace(r.Header.Get("Authorization"))), want) != 1 {
			http.Error(w, "a valid bearer token is required", http.StatusUnauthorized)
			return
		}
		f, disk, err := open()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer f.Close()
		w.Header().Set("Content-Type", "application/octet-stream")
		// The disk does not change while it is served: its content is
		// the image, the claim read-only.
		http.ServeContent(w, r, "", time.Time{}, disk)
	})
	return mux
}
