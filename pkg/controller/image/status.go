package image

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"

	"vimg.dev/vimg/pkg/worker/api"
)

// progressOf reads the worker's progress annotation.
func progressOf(p *corev1.Pod) (api.Progress, bool) {
	s, ok := p.Annotations[api.AnnotationProgress]
	if !ok {
		return api.Progress{}, false
	}
	pr, err := api.DecodeProgress(s)
	return pr, err == nil
}

// outcomeOf reads the worker's termination message.
func outcomeOf(p *corev1.Pod) (api.Outcome, bool) {
	for _, cs := range p.Status.ContainerStatuses {
		if t := cs.State.Terminated; t != nil && t.Message != "" {
			o, err := api.DecodeOutcome(t.Message)
			return o, err == nil
		}
	}
	return api.Outcome{}, false
}

// podFailureMessage explains a pod that failed without an outcome: killed
// for memory, evicted, deleted mid-way.
func podFailureMessage(p *corev1.Pod) string {
	for _, cs := range p.Status.ContainerStatuses {
		if t := cs.State.Terminated; t != nil {
			return fmt.Sprintf("import pod %s ended with exit code %d (%s)", p.Name, t.ExitCode, t.Reason)
		}
	}
	if p.Status.Reason != "" {
		return fmt.Sprintf("import pod %s failed: %s: %s", p.Name, p.Status.Reason, p.Status.Message)
	}
	return fmt.Sprintf("import pod %s failed", p.Name)
}

// podWaitingReason says why a pod's container has not started, if it is
// stuck somewhere a user or an admin must look (image pull, scheduling).
func podWaitingReason(p *corev1.Pod) string {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodScheduled && c.Status == corev1.ConditionFalse && c.Reason == corev1.PodReasonUnschedulable {
			return "unschedulable: " + c.Message
		}
	}
	for _, cs := range p.Status.ContainerStatuses {
		if w := cs.State.Waiting; w != nil && w.Reason != "" && w.Reason != "ContainerCreating" && w.Reason != "PodInitializing" {
			return w.Reason + ": " + w.Message
		}
	}
	return ""
}

func finishedAt(p *corev1.Pod) time.Time {
	for _, cs := range p.Status.ContainerStatuses {
		if t := cs.State.Terminated; t != nil {
			return t.FinishedAt.Time
		}
	}
	return p.CreationTimestamp.Time
}

// monotonicPercent renders fraction as status.progress, never below what
// is already shown and never 100% before the image is Ready.
func monotonicPercent(cur string, fraction float64) string {
	const ceiling = 0.999
	f := min(max(fraction, 0), ceiling)
	if prev, ok := parsePercent(cur); ok && prev > f {
		return cur
	}
	return api.Percent(f)
}

// parsePercent reads "45.2%" (status.progress, the populator's progress
// annotation) as 0.452.
func parsePercent(s string) (float64, bool) {
	f, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
	if err != nil || !strings.HasSuffix(s, "%") {
		return 0, false
	}
	return min(max(f/100, 0), 1), true
}

// iecSize renders bytes the way kubectl shows quantities, with one
// decimal: "285.7Mi", "512B".
func iecSize(n int64) string {
	v, unit := api.IEC(n)
	if unit == "" {
		return strconv.FormatInt(n, 10) + "B"
	}
	return strconv.FormatFloat(v, 'f', 1, 64) + unit
}

func iecSpeed(bps int64) string { return iecSize(bps) + "/s" }
