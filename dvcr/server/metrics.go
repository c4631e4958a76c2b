package server

import (
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"vimg.dev/vimg/dvcr/auth"
)

// metrics are DVCR's own series. Every label has a fixed, small set of
// values: never a repository, user or URL. They live in a registry per
// Server (so tests can build several servers in one process) and are served
// together with the default registry, where distribution registers its
// storage metrics and client_golang the process and Go runtime ones.
type metrics struct {
	reg      *prometheus.Registry
	tokens   *prometheus.CounterVec
	failures *prometheus.CounterVec
	requests *prometheus.CounterVec
	inflight *prometheus.GaugeVec
}

func newMetrics() *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dvcr_auth_tokens_issued_total",
			Help: "Tokens issued by the token endpoint, by the user's role.",
		}, []string{"role"}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dvcr_auth_failures_total",
			Help: "Refused authentications and authorizations, by reason.",
		}, []string{"reason"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dvcr_http_requests_total",
			Help: "HTTP requests answered, by endpoint, method and status code.",
		}, []string{"handler", "method", "code"}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "dvcr_http_requests_in_flight",
			Help: "HTTP requests being served, by endpoint.",
		}, []string{"handler"}),
	}
	m.reg.MustRegister(m.tokens, m.failures, m.requests, m.inflight)
	// Pre-create the series so that dashboards see zeros rather than gaps.
	for _, r := range []auth.Role{auth.RoleAdmin, auth.RolePull} {
		m.tokens.WithLabelValues(string(r))
	}
	for _, r := range []auth.FailureReason{auth.ReasonNoCredentials, auth.ReasonBadCredentials,
		auth.ReasonInvalidToken, auth.ReasonExpiredToken, auth.ReasonInsufficientScope, auth.ReasonBadRequest} {
		m.failures.WithLabelValues(string(r))
	}
	return m
}

// TokenIssued implements auth.Observer.
func (m *metrics) TokenIssued(role auth.Role) { m.tokens.WithLabelValues(string(role)).Inc() }

// AuthFailed implements auth.Observer.
func (m *metrics) AuthFailed(reason auth.FailureReason) {
	m.failures.WithLabelValues(string(reason)).Inc()
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(prometheus.Gatherers{m.reg, prometheus.DefaultGatherer}, promhttp.HandlerOpts{})
}

// instrument counts requests to h under the label name.
func (m *metrics) instrument(name string, h http.Handler) http.Handler {
	inflight := m.inflight.WithLabelValues(name)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inflight.Inc()
		defer inflight.Dec()
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			m.requests.WithLabelValues(name, methodLabel(r.Method), strconv.Itoa(sw.code())).Inc()
		}()
		h.ServeHTTP(sw, r)
	})
}

func methodLabel(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete:
		return m
	}
	return "other"
}

// statusWriter remembers the status code. Flush and Unwrap keep the
// underlying writer's abilities reachable (http.ResponseController), which
// long blob transfers rely on for deadlines and flushing.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) code() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}
