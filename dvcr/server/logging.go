package server

import (
	"fmt"
	"net/http"
	"regexp"
	"sort"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"
	"k8s.io/klog/v2"
)

// Distribution logs through logrus' standard logger. routeRegistryLogs sends
// those entries to klog so that the process has one log stream with one set
// of verbosity flags, and scrubs credentials on the way:
//
//   - logrus error/fatal/panic -> klog error
//   - warning                  -> klog info (always shown), level=warning,
//     except refused authorizations, which are routine -> V(2)
//   - info (e.g. the per-request "response completed" access line) -> V(2)
//   - debug/trace              -> V(5)
var routeRegistryLogs = sync.OnceFunc(func() {
	l := logrus.StandardLogger()
	l.SetFormatter(discardFormatter{})
	l.SetLevel(logrus.DebugLevel)
	l.AddHook(klogHook{logger: klog.Background().WithName("registry")})
})

// discardFormatter makes logrus skip its own output: the hook has already
// forwarded the entry.
type discardFormatter struct{}

func (discardFormatter) Format(*logrus.Entry) ([]byte, error) { return nil, nil }

type klogHook struct{ logger klog.Logger }

func (klogHook) Levels() []logrus.Level { return logrus.AllLevels }

func (h klogHook) Fire(e *logrus.Entry) error {
	keys := make([]string, 0, len(e.Data))
	for k := range e.Data {
		if k == "go.version" || k == "instance.id" {
			continue // the same on every line
		}
		keys = append(keys, k)
	}
	sort.Strings(keys)
	kv := make([]any, 0, 2*len(keys)+2)
	for _, k := range keys {
		kv = append(kv, k, scrubField(k, e.Data[k]))
	}
	msg := scrub(e.Message)
	switch {
	case e.Level <= logrus.ErrorLevel:
		h.logger.Error(nil, msg, kv...)
	case e.Level == logrus.WarnLevel && strings.HasPrefix(msg, "error authorizing context"):
		// Every client's first request is anonymous by protocol (it
		// fetches the challenge), so refusals are routine: they are
		// counted in dvcr_auth_failures_total and logged at V(2).
		h.logger.V(2).Info(msg, kv...)
	case e.Level == logrus.WarnLevel:
		h.logger.Info(msg, append(kv, "level", "warning")...)
	case e.Level == logrus.InfoLevel:
		h.logger.V(2).Info(msg, kv...)
	default:
		h.logger.V(5).Info(msg, kv...)
	}
	return nil
}

// credentialPattern finds HTTP credentials in free text, in case a header
// value ever ends up in an error message.
var credentialPattern = regexp.MustCompile(`(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+`)

func scrub(s string) string {
	return credentialPattern.ReplaceAllString(s, "$1 [redacted]")
}

func scrubField(key string, v any) any {
	k := strings.ToLower(key)
	for _, secret := range []string{"authorization", "password", "secret", "token", "cookie"} {
		if strings.Contains(k, secret) {
			return "[redacted]"
		}
	}
	switch v := v.(type) {
	case *http.Request:
		return v.Method + " " + v.URL.Path // never the headers
	case string:
		return scrub(v)
	case error:
		return scrub(v.Error())
	case fmt.Stringer:
		return scrub(v.String())
	}
	return v
}
