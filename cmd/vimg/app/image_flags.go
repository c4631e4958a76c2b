package app

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"vimg.dev/vimg/pkg/diskimage/source"
)

// sourceFlags are the options for reading an image from a path, stdin or a URL.
type sourceFlags struct {
	headers  []string
	caFile   string
	insecure bool
	userEnv  string
	timeout  time.Duration
}

func (f *sourceFlags) register(fs *pflag.FlagSet) {
	fs.StringArrayVar(&f.headers, "header", nil, "extra HTTP request header `Name: value` (repeatable)")
	fs.StringVar(&f.caFile, "ca-file", "", "PEM file with the CA certificates to trust for an https URL")
	fs.BoolVar(&f.insecure, "insecure-skip-verify", false, "do not verify the https server's certificate")
	fs.StringVar(&f.userEnv, "auth-env", "", "basic auth for an http(s) URL from environment variables `PREFIX`_USERNAME and PREFIX_PASSWORD (kept off the command line)")
	fs.DurationVar(&f.timeout, "http-timeout", 30*time.Second, "per-request connect and response-header timeout")
}

// open opens SRC: a path, an http(s) URL, or - for stdin.
func (f *sourceFlags) open(ctx context.Context, spec string) (source.Source, error) {
	opts, err := f.httpOptions()
	if err != nil {
		return nil, err
	}
	return source.Open(ctx, spec, opts)
}

func (f *sourceFlags) httpOptions() (source.HTTPOptions, error) {
	opts := source.HTTPOptions{Header: http.Header{}, InsecureSkipVerify: f.insecure, Timeout: f.timeout}
	for _, h := range f.headers {
		name, value, ok := strings.Cut(h, ":")
		if !ok || strings.TrimSpace(name) == "" {
			return opts, fmt.Errorf("--header %q: want \"Name: value\"", h)
		}
		opts.Header.Add(strings.TrimSpace(name), strings.TrimSpace(value))
	}
	if f.caFile != "" {
		pem, err := os.ReadFile(f.caFile)
		if err != nil {
			return opts, fmt.Errorf("--ca-file: %w", err)
		}
		opts.CABundle = pem
	}
	if f.userEnv != "" {
		opts.Username = os.Getenv(f.userEnv + "_USERNAME")
		opts.Password = os.Getenv(f.userEnv + "_PASSWORD")
		if opts.Username == "" {
			return opts, fmt.Errorf("--auth-env %s: %s_USERNAME is not set", f.userEnv, f.userEnv)
		}
	}
	return opts, nil
}
